//! `inventory`: stock per warehouse and SKU (`stock/<warehouse>/<sku>`) and
//! totals per SKU across warehouses (`sku/<sku>`). Closing a warehouse finds its
//! stock with a prefix scan, removes it and corrects every SKU total it touched.

use kiln_sdk::{Event, Projection, Result, View};
use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize)]
pub enum InventoryEvent {
    StockReceived { sku: String, qty: u64 },
    StockShipped { sku: String, qty: u64 },
    WarehouseClosed {},
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stock {
    pub warehouse: String,
    pub sku: String,
    pub qty: u64,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct SkuTotal {
    pub qty: u64,
    /// Units shipped although the warehouse's stock did not show them.
    pub oversold: u64,
}

pub struct Inventory;

pub fn stock_prefix(warehouse: &str) -> String {
    format!("stock/{warehouse}/")
}

pub fn sku_key(sku: &str) -> String {
    format!("sku/{sku}")
}

impl Projection for Inventory {
    const NAME: &'static str = "inventory";
    const EVENTS: &'static [&'static str] = &["StockReceived", "StockShipped", "WarehouseClosed"];
    const CATEGORIES: &'static [&'static str] = &["warehouse"];
    type Event = InventoryEvent;

    fn handle(e: &Event<'_, InventoryEvent>, view: &mut View<'_>) -> Result<()> {
        let warehouse = e.stream_key();
        match &e.data {
            InventoryEvent::StockReceived { sku, qty } => {
                let key = format!("{}{sku}", stock_prefix(warehouse));
                view.update(&key, |s: &mut Stock| {
                    s.warehouse = warehouse.to_string();
                    s.sku.clone_from(sku);
                    s.qty += qty;
                })?;
                view.update(&sku_key(sku), |t: &mut SkuTotal| t.qty += qty)
            }
            InventoryEvent::StockShipped { sku, qty } => {
                let key = format!("{}{sku}", stock_prefix(warehouse));
                let mut stock: Stock = view.get_or_default(&key)?;
                let shipped = (*qty).min(stock.qty);
                stock.qty -= shipped;
                if stock.qty == 0 {
                    view.delete(&key);
                } else {
                    view.put(&key, &stock)?;
                }
                view.update(&sku_key(sku), |t: &mut SkuTotal| {
                    t.qty = t.qty.saturating_sub(shipped);
                    t.oversold += qty - shipped;
                })
            }
            InventoryEvent::WarehouseClosed {} => {
                for (key, stock) in view.scan::<Stock>(&stock_prefix(warehouse))? {
                    view.update(&sku_key(&stock.sku), |t: &mut SkuTotal| {
                        t.qty = t.qty.saturating_sub(stock.qty)
                    })?;
                    view.delete(&key);
                }
                Ok(())
            }
        }
    }
}

kiln_sdk::export!(Inventory);

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_sdk::Harness;
    use serde_json::json;

    fn receive(h: &mut Harness<Inventory>, wh: &str, sku: &str, qty: u64) {
        h.event(
            &format!("warehouse-{wh}"),
            "StockReceived",
            json!({"sku": sku, "qty": qty}),
        )
        .unwrap();
    }

    #[test]
    fn totals_sum_warehouses_and_shipping_cannot_go_negative() {
        let mut h = Harness::<Inventory>::new();
        receive(&mut h, "north", "tea", 10);
        receive(&mut h, "south", "tea", 5);
        h.event(
            "warehouse-south",
            "StockShipped",
            json!({"sku": "tea", "qty": 7}),
        )
        .unwrap();
        assert_eq!(
            h.doc::<SkuTotal>("sku/tea").unwrap(),
            SkuTotal {
                qty: 10,
                oversold: 2
            }
        );
        assert!(
            h.json("stock/south/tea").is_none(),
            "emptied stock is deleted"
        );
        assert_eq!(h.doc::<Stock>("stock/north/tea").unwrap().qty, 10);
    }

    #[test]
    fn closing_a_warehouse_scans_only_its_prefix() {
        let mut h = Harness::<Inventory>::new();
        receive(&mut h, "a", "tea", 3);
        receive(&mut h, "a", "cups", 4);
        receive(&mut h, "ab", "tea", 1); // shares the text prefix "a" but not "a/"
        receive(&mut h, "b", "tea", 2);
        h.event("warehouse-a", "WarehouseClosed", json!({}))
            .unwrap();
        let keys: Vec<_> = h.documents().keys().cloned().collect();
        assert_eq!(keys, ["sku/cups", "sku/tea", "stock/ab/tea", "stock/b/tea"]);
        assert_eq!(h.doc::<SkuTotal>("sku/tea").unwrap().qty, 3);
        assert_eq!(h.doc::<SkuTotal>("sku/cups").unwrap().qty, 0);
    }
}
