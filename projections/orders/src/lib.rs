//! `orders`: an order document per order stream (`order-<id>` → key
//! `order/<id>`) and running totals per customer (`customer/<id>`), both
//! updated from the same events.

use kiln_sdk::{Error, Event, Projection, Result, View};
use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize)]
pub enum OrderEvent {
    OrderPlaced { customer: String, lines: Vec<Line> },
    OrderPaid {},
    OrderShipped {},
    OrderCancelled { reason: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Line {
    pub sku: String,
    pub qty: u32,
    pub unit_cents: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    #[default]
    Placed,
    Paid,
    Shipped,
    Cancelled,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Order {
    pub id: String,
    pub customer: String,
    pub status: Status,
    pub lines: Vec<Line>,
    pub total_cents: u64,
    pub placed_at: u64,
    pub cancel_reason: Option<String>,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct CustomerTotals {
    pub orders: u64,
    pub open_orders: u64,
    pub cancelled: u64,
    pub spent_cents: u64,
}

pub struct Orders;

pub fn order_key(id: &str) -> String {
    format!("order/{id}")
}

pub fn customer_key(id: &str) -> String {
    format!("customer/{id}")
}

impl Projection for Orders {
    const NAME: &'static str = "orders";
    const EVENTS: &'static [&'static str] =
        &["OrderPlaced", "OrderPaid", "OrderShipped", "OrderCancelled"];
    const CATEGORIES: &'static [&'static str] = &["order"];
    type Event = OrderEvent;

    fn handle(e: &Event<'_, OrderEvent>, view: &mut View<'_>) -> Result<()> {
        let id = e.stream_key();
        let key = order_key(id);
        if let OrderEvent::OrderPlaced { customer, lines } = &e.data {
            let total_cents = lines.iter().map(|l| u64::from(l.qty) * l.unit_cents).sum();
            let order = Order {
                id: id.to_string(),
                customer: customer.clone(),
                status: Status::Placed,
                lines: lines.clone(),
                total_cents,
                placed_at: e.timestamp,
                cancel_reason: None,
            };
            view.put(&key, &order)?;
            return view.update(&customer_key(customer), |t: &mut CustomerTotals| {
                t.orders += 1;
                t.open_orders += 1;
                t.spent_cents += total_cents;
            });
        }
        let mut order: Order = view.get(&key)?.ok_or_else(|| {
            Error::msg(format!(
                "{} for order {id}, which was never placed",
                e.event_type
            ))
        })?;
        let was_open = matches!(order.status, Status::Placed | Status::Paid);
        match &e.data {
            OrderEvent::OrderPlaced { .. } => unreachable!("handled above"),
            OrderEvent::OrderPaid {} => order.status = Status::Paid,
            OrderEvent::OrderShipped {} => order.status = Status::Shipped,
            OrderEvent::OrderCancelled { reason } => {
                order.status = Status::Cancelled;
                order.cancel_reason = Some(reason.clone());
            }
        }
        let still_open = matches!(order.status, Status::Placed | Status::Paid);
        let cancelled = order.status == Status::Cancelled && was_open;
        view.put(&key, &order)?;
        if was_open != still_open || cancelled {
            view.update(&customer_key(&order.customer), |t: &mut CustomerTotals| {
                if was_open && !still_open {
                    t.open_orders = t.open_orders.saturating_sub(1);
                }
                if cancelled {
                    t.cancelled += 1;
                    t.spent_cents = t.spent_cents.saturating_sub(order.total_cents);
                }
            })?;
        }
        Ok(())
    }
}

kiln_sdk::export!(Orders);

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_sdk::Harness;
    use serde_json::json;

    fn place(h: &mut Harness<Orders>, order: &str, customer: &str, cents: u64) {
        h.event(
            &format!("order-{order}"),
            "OrderPlaced",
            json!({"customer": customer, "lines": [{"sku": "tea", "qty": 2, "unit_cents": cents}]}),
        )
        .unwrap();
    }

    #[test]
    fn one_event_updates_the_order_and_its_customer() {
        let mut h = Harness::<Orders>::new();
        place(&mut h, "1", "c1", 150);
        place(&mut h, "2", "c1", 100);
        place(&mut h, "3", "c2", 10);
        let o: Order = h.doc("order/1").unwrap();
        assert_eq!(
            (o.customer.as_str(), o.total_cents, o.status),
            ("c1", 300, Status::Placed)
        );
        let t: CustomerTotals = h.doc("customer/c1").unwrap();
        assert_eq!(
            t,
            CustomerTotals {
                orders: 2,
                open_orders: 2,
                cancelled: 0,
                spent_cents: 500
            }
        );
        assert_eq!(
            h.doc::<CustomerTotals>("customer/c2").unwrap().spent_cents,
            20
        );
    }

    #[test]
    fn shipping_closes_and_cancelling_refunds() {
        let mut h = Harness::<Orders>::new();
        place(&mut h, "1", "c1", 150);
        place(&mut h, "2", "c1", 100);
        h.event("order-1", "OrderPaid", json!({})).unwrap();
        h.event("order-1", "OrderShipped", json!({})).unwrap();
        h.event(
            "order-2",
            "OrderCancelled",
            json!({"reason": "changed mind"}),
        )
        .unwrap();
        let t: CustomerTotals = h.doc("customer/c1").unwrap();
        assert_eq!(
            t,
            CustomerTotals {
                orders: 2,
                open_orders: 0,
                cancelled: 1,
                spent_cents: 300
            }
        );
        let o: Order = h.doc("order/2").unwrap();
        assert_eq!(o.status, Status::Cancelled);
        assert_eq!(o.cancel_reason.as_deref(), Some("changed mind"));
    }

    #[test]
    fn event_for_unknown_order_fails_with_its_position() {
        let mut h = Harness::<Orders>::new();
        place(&mut h, "1", "c1", 1);
        let err = h.event("order-9", "OrderShipped", json!({})).err().unwrap();
        assert_eq!(err.position, 2);
        assert!(
            err.message.contains("order 9, which was never placed"),
            "{err}"
        );
    }
}
