//! `GET /fleet`: the fleet this instance belongs to, as its KV buckets hold
//! it now (every live member, its versions, lag and digests; every fleet
//! name's decision; the digests that disagree). See [`crate::fleet`].

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;

use super::{ApiError, AppState};
use crate::fleet::FleetStatus;

/// `GET /fleet`.
pub async fn status(State(state): State<AppState>) -> Result<Json<FleetStatus>, ApiError> {
    let Some(fleet) = &state.fleet else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no_fleet",
            "this instance is in no fleet (set [fleet] name or --fleet, on JetStream)",
        ));
    };
    fleet.status().await.map(Json).map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "fleet_unavailable",
            e.to_string(),
        )
    })
}
