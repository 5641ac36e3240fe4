//! Statements pinned to one shard by their shard keys, however they are built.
//!
//! A query with WITH, UNION/INTERSECT/EXCEPT or subqueries cannot be merged across shards, but
//! it does not need to be when every sharded table in it is read only for shard-key values of
//! one shard: each SELECT that reads sharded tables restricts their key (`key = 5`, `key = $1`,
//! co-located joins) to the same shard, so that shard holds every row the statement can see and
//! runs it whole (what Citus calls a router query). Anything else keeps its own plan or error.

use std::collections::HashSet;
use std::ops::ControlFlow;

use sqlparser::ast::{Query, Select, SetExpr, TableFactor, Visit, Visitor};

use super::{
    PlanError, TableUse, Target, analyze_from_with, key_restriction, last_name, normalize,
    route_keys,
};
use crate::topology::Topology;

/// Is the query one SELECT whose sharded tables are all in its own FROM, and without tables
/// the router does not know (the shape the scatter-gather planner handles)?
pub(super) fn is_flat(topology: &Topology, query: &Query, usage: &TableUse) -> bool {
    match query.body.as_ref() {
        SetExpr::Select(select) => {
            query.with.is_none()
                && usage.other == 0
                && sharded_in_from(topology, select, &HashSet::new()) == usage.sharded.len()
        }
        _ => false,
    }
}

/// The one shard every sharded table of `query` is restricted to, if there is one.
pub(super) fn one_shard(topology: &Topology, query: &Query) -> Option<Target> {
    let mut names = CteNames::default();
    let _ = query.visit(&mut names);
    // Tables other than sharded, reference and catalog ones live on one shard only: their
    // rows cannot be checked.
    let mut unknown = 0;
    let _ = sqlparser::ast::visit_relations(query, |name| {
        let table = last_name(name);
        let catalog = name.0.len() > 1
            && matches!(
                name.0[0].as_ident().map(normalize).as_deref(),
                Some("pg_catalog" | "information_schema")
            );
        if !catalog
            && !topology.tables.contains_key(&table)
            && !topology.is_reference(&table)
            && !names.0.contains(&table)
        {
            unknown += 1;
        }
        ControlFlow::<()>::Continue(())
    });
    if unknown > 0 {
        return None;
    }
    let mut pins = Pins {
        topology,
        ctes: names.0,
        targets: Vec::new(),
        covered: 0,
        failed: false,
    };
    let _ = query.visit(&mut pins);
    let sharded = super::table_use(topology, query).sharded.len();
    if pins.failed || pins.covered != sharded {
        return None;
    }
    let first = pins.targets.first()?.clone();
    pins.targets
        .iter()
        .all(|target| *target == first)
        .then_some(first)
}

/// Names of the WITH queries anywhere in a statement.
#[derive(Default)]
struct CteNames(HashSet<String>);

impl Visitor for CteNames {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if let Some(with) = &query.with {
            for cte in &with.cte_tables {
                self.0.insert(normalize(&cte.alias.name));
            }
        }
        ControlFlow::Continue(())
    }
}

/// Collects, for each SELECT reading sharded tables, the shard its keys restrict it to.
struct Pins<'a> {
    topology: &'a Topology,
    ctes: HashSet<String>,
    targets: Vec<Target>,
    /// Sharded table references checked.
    covered: usize,
    failed: bool,
}

impl Visitor for Pins<'_> {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        let mut selects = Vec::new();
        selects_of(query.body.as_ref(), &mut selects);
        for select in selects {
            match self.pin(select) {
                Ok(Some(target)) => self.targets.push(target),
                Ok(None) => {}
                Err(_) => {
                    self.failed = true;
                    return ControlFlow::Break(());
                }
            }
        }
        ControlFlow::Continue(())
    }
}

impl Pins<'_> {
    /// The shard one SELECT's sharded tables are restricted to (`None`: it reads none).
    fn pin(&mut self, select: &Select) -> Result<Option<Target>, PlanError> {
        let count = sharded_in_from(self.topology, select, &self.ctes);
        if count == 0 {
            return Ok(None);
        }
        self.covered += count;
        let from = analyze_from_with(self.topology, select, true)?;
        let key_type = self.topology.groups[from.group].key_type;
        let keys = select
            .selection
            .as_ref()
            .map(|s| key_restriction(s, &from.key_columns, key_type))
            .unwrap_or_default();
        route_keys(
            self.topology,
            from.group,
            keys,
            |target| Ok(Some(target)),
            |_| {
                Err(PlanError::Unsupported(
                    "a subquery over several shards".into(),
                ))
            },
        )
    }
}

/// The SELECTs of a query body (through set operations; nested queries are visited on their
/// own).
fn selects_of<'q>(body: &'q SetExpr, out: &mut Vec<&'q Select>) {
    match body {
        SetExpr::Select(select) => out.push(select),
        SetExpr::SetOperation { left, right, .. } => {
            selects_of(left, out);
            selects_of(right, out);
        }
        _ => {}
    }
}

/// How many sharded tables a SELECT names in its own FROM (joins included).
pub(super) fn sharded_in_from(
    topology: &Topology,
    select: &Select,
    ctes: &HashSet<String>,
) -> usize {
    let is_sharded = |factor: &TableFactor| match factor {
        TableFactor::Table { name, .. } => {
            let table = last_name(name);
            topology.tables.contains_key(&table) && !(name.0.len() == 1 && ctes.contains(&table))
        }
        _ => false,
    };
    select
        .from
        .iter()
        .map(|table| {
            usize::from(is_sharded(&table.relation))
                + table
                    .joins
                    .iter()
                    .filter(|join| is_sharded(&join.relation))
                    .count()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use crate::plan::tests::{plan, topology};
    use crate::plan::{Plan, Target, shard_of};
    use crate::vindex::KeyValue;

    fn shard(key: i64) -> Target {
        Target::Shard(shard_of(&topology(), 0, &KeyValue::Int(key)).unwrap())
    }

    /// Two keys that live on different shards.
    fn keys_on_two_shards() -> (i64, i64) {
        let first = 1;
        let other = (2..1000).find(|k| shard(*k) != shard(first)).unwrap();
        (first, other)
    }

    #[test]
    fn statements_whose_sharded_tables_all_name_one_shard_run_there_whole() {
        let pinned = [
            "WITH recent AS (SELECT * FROM orders WHERE customer_id = 7 ORDER BY id DESC LIMIT 5) \
             SELECT count(*) FROM recent",
            "SELECT id FROM orders WHERE customer_id = 7 UNION SELECT id FROM customers WHERE id = 7",
            "SELECT * FROM customers WHERE id = 7 AND EXISTS \
             (SELECT 1 FROM orders WHERE customer_id = 7 AND total > 10)",
            "SELECT o.id, row_number() OVER (ORDER BY o.total) FROM \
             (SELECT * FROM orders WHERE customer_id = 7) o JOIN customers c ON c.id = 7 \
             WHERE c.id = 7",
            "SELECT count(DISTINCT total) FROM orders WHERE customer_id = 7 \
             AND id IN (SELECT id FROM orders WHERE customer_id = 7)",
            "WITH c AS (SELECT * FROM customers WHERE id = 7) SELECT c.name, x.code \
             FROM c, countries x",
        ];
        for sql in pinned {
            assert_eq!(
                plan(sql).unwrap_or_else(|e| panic!("{sql}: {e}")).plan,
                Plan::Single(shard(7)),
                "{sql}"
            );
        }
        let planned = plan(
            "WITH o AS (SELECT * FROM orders WHERE customer_id = $1) \
             SELECT * FROM o UNION ALL SELECT * FROM orders WHERE customer_id = $1",
        )
        .unwrap();
        assert_eq!(
            planned.plan,
            Plan::Single(Target::Param { param: 1, group: 0 })
        );
    }

    #[test]
    fn statements_that_reach_several_shards_are_not_pinned() {
        let (a, b) = keys_on_two_shards();
        let several = [
            format!(
                "SELECT id FROM orders WHERE customer_id = {a} INTERSECT SELECT id FROM orders WHERE customer_id = {b}"
            ),
            format!(
                "SELECT * FROM customers WHERE id = {a} AND EXISTS (SELECT 1 FROM orders o WHERE o.id = customers.id)"
            ),
            "SELECT id FROM orders WHERE customer_id = $1 INTERSECT SELECT id FROM orders WHERE customer_id = $2"
                .to_string(),
            format!("SELECT * FROM orders WHERE customer_id = {a} OR customer_id = {b} UNION SELECT 1, 2, 3"),
        ];
        // They run in stages (the set operations), or are refused (the correlated subquery on
        // a column that is not the shard key): never on one shard.
        for sql in &several {
            match plan(sql) {
                Ok(planned) => assert!(
                    matches!(planned.plan, Plan::MultiStage(_)),
                    "{sql}: {planned:?}"
                ),
                Err(error) => assert_eq!(error.sqlstate(), "0A000", "{sql}: {error}"),
            }
        }
    }
}
