//! Standard deviation and variance across shards, from partial sums.
//!
//! `var_samp(x)` (and `variance`, `var_pop`, `stddev`, `stddev_samp`, `stddev_pop`) cannot be
//! merged from the shards' own variances, but it can from three sums: each shard sends
//! `count(x)`, `sum(x::numeric)` and `sum(x::numeric * x::numeric)`, the merger adds them up per
//! group, and the final statement over the merged groups computes what PostgreSQL's
//! `numeric_stddev_internal` computes from the same state: `(n * Σx² - (Σx)²) / (n * (n - 1))`
//! (`n * n` for the population), 0 when rounding makes the numerator negative, the square root
//! at the quotient's scale for the standard deviations. The sums are exact numerics, so over
//! integer and numeric arguments the answer is PostgreSQL's digit for digit.
//!
//! Floating-point arguments go through `float8` to `numeric` (`x + 0::numeric` is `float8` for
//! `real` and `double precision`, `numeric` for the others) and the result back to `float8`:
//! PostgreSQL's own float variance (Youngs-Cramer in `float8`) agrees to floating-point
//! tolerance. The result type follows the argument's as PostgreSQL's does (`float8` for float
//! arguments, `numeric` otherwise) through a fourth shard column of that type, always NULL
//! (`var_samp(x) FILTER (WHERE false)`), which the final statement's CASE takes its type from.

use sqlparser::ast::{
    CastKind, DataType, ExactNumberInfo, Expr, FunctionArg, FunctionArgExpr, FunctionArguments,
    Ident, ObjectName, SelectItem, SetExpr,
};

use super::{PlanError, parse_query, sole_argument, unsupported};

/// A variance aggregate: sample (n - 1) or population (n) divisor, and whether it is the square
/// root (standard deviation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Variance {
    /// `var_samp`, `variance`, `stddev_samp`, `stddev`: divide by n * (n - 1).
    pub(super) sample: bool,
    /// `stddev*`: the square root of the variance.
    pub(super) root: bool,
}

/// The variance aggregate `name` is, if it is one.
pub(super) fn variance_of(name: &str) -> Option<Variance> {
    let (sample, root) = match name {
        "variance" | "var_samp" => (true, false),
        "var_pop" => (false, false),
        "stddev" | "stddev_samp" => (true, true),
        "stddev_pop" => (false, true),
        _ => return None,
    };
    Some(Variance { sample, root })
}

/// The shard aggregates a variance call merges from.
pub(super) struct Partials {
    /// `count(x)`: merged as a count.
    pub(super) count: Expr,
    /// `sum(x::numeric)`: merged as a sum.
    pub(super) sum: Expr,
    /// `sum(x::numeric * x::numeric)`: merged as a sum.
    pub(super) squares: Expr,
    /// `var_samp(x) FILTER (WHERE false)`: NULL of the result type, merged as a minimum.
    pub(super) witness: Expr,
}

/// The shard aggregates of the variance call `call` (its FILTER kept on the sums).
pub(super) fn partials(call: &Expr) -> Result<Partials, PlanError> {
    let Some(argument) = sole_argument(call) else {
        return unsupported("a variance or standard deviation of several arguments across shards");
    };
    // float4 and float8 become float8, the others numeric; then numeric.
    let exact = Expr::Cast {
        kind: CastKind::DoubleColon,
        expr: Box::new(Expr::Nested(Box::new(Expr::BinaryOp {
            left: Box::new(Expr::Nested(Box::new(argument.clone()))),
            op: sqlparser::ast::BinaryOperator::Plus,
            right: Box::new(Expr::Cast {
                kind: CastKind::DoubleColon,
                expr: Box::new(Expr::value(sqlparser::ast::Value::Number(
                    "0".into(),
                    false,
                ))),
                data_type: DataType::Numeric(ExactNumberInfo::None),
                format: None,
            }),
        }))),
        data_type: DataType::Numeric(ExactNumberInfo::None),
        format: None,
    };
    let square = Expr::BinaryOp {
        left: Box::new(exact.clone()),
        op: sqlparser::ast::BinaryOperator::Multiply,
        right: Box::new(exact.clone()),
    };
    let mut witness = call_of(call, "var_samp", argument.clone());
    if let Expr::Function(function) = &mut witness {
        function.filter = Some(Box::new(Expr::value(sqlparser::ast::Value::Boolean(false))));
    }
    Ok(Partials {
        count: call_of(call, "count", argument),
        sum: call_of(call, "sum", exact),
        squares: call_of(call, "sum", square),
        witness,
    })
}

/// `call` renamed to `name` with the one argument `argument` (its FILTER kept).
fn call_of(call: &Expr, name: &str, argument: Expr) -> Expr {
    let mut call = call.clone();
    if let Expr::Function(function) = &mut call {
        function.name = ObjectName::from(vec![Ident::new(name)]);
        if let FunctionArguments::List(list) = &mut function.args {
            list.args = vec![FunctionArg::Unnamed(FunctionArgExpr::Expr(argument))];
        }
    }
    call
}

/// The final statement's expression of `variance` over the merged partials (`n`, `sum`,
/// `squares`, `witness`: expressions reading the merged columns).
pub(super) fn final_expr(
    variance: Variance,
    n: &Expr,
    sum: &Expr,
    squares: &Expr,
    witness: &Expr,
) -> Result<Expr, PlanError> {
    let numerator = format!("({n} * {squares} - {sum} * {sum})");
    let (least, divisor) = if variance.sample {
        (1, format!("({n} * ({n} - 1))"))
    } else {
        (0, format!("({n} * {n})"))
    };
    let quotient = format!("({numerator} / {divisor})");
    let value = if variance.root {
        // numeric_stddev_internal takes the root at the quotient's scale (NaN has none).
        format!(
            "pg_catalog.round(pg_catalog.sqrt({quotient}), coalesce(pg_catalog.scale({quotient}), 0))"
        )
    } else {
        quotient
    };
    let sql = format!(
        "SELECT CASE WHEN false THEN {witness} ELSE CASE WHEN {n} > {least} THEN \
         CASE WHEN {numerator} > 0 THEN {value} ELSE 0 END END END"
    );
    let query = parse_query(&sql)?;
    match *query.body {
        SetExpr::Select(select) => match select.projection.into_iter().next() {
            Some(SelectItem::UnnamedExpr(expr)) => Ok(expr),
            _ => unsupported("a variance's final expression"),
        },
        _ => unsupported("a variance's final expression"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_sums_and_the_final_expression() {
        let call = parse_query("SELECT stddev_pop(o.total) FILTER (WHERE o.qty > 2)").unwrap();
        let SetExpr::Select(select) = *call.body else {
            panic!()
        };
        let SelectItem::UnnamedExpr(call) = &select.projection[0] else {
            panic!()
        };
        let partials = partials(call).unwrap();
        assert_eq!(
            partials.count.to_string(),
            "count(o.total) FILTER (WHERE o.qty > 2)"
        );
        assert_eq!(
            partials.squares.to_string(),
            "sum(((o.total) + 0::NUMERIC)::NUMERIC * ((o.total) + 0::NUMERIC)::NUMERIC) \
             FILTER (WHERE o.qty > 2)"
        );
        assert_eq!(
            partials.witness.to_string(),
            "var_samp(o.total) FILTER (WHERE false)"
        );
        let column = |name: &str| Expr::Identifier(Ident::new(name));
        let expr = final_expr(
            variance_of("stddev_pop").unwrap(),
            &column("n"),
            &column("s"),
            &column("q"),
            &column("w"),
        )
        .unwrap();
        assert_eq!(
            expr.to_string(),
            "CASE WHEN false THEN w ELSE CASE WHEN n > 0 THEN CASE WHEN (n * q - s * s) > 0 \
             THEN pg_catalog.round(pg_catalog.sqrt(((n * q - s * s) / (n * n))), \
             coalesce(pg_catalog.scale(((n * q - s * s) / (n * n))), 0)) ELSE 0 END END END"
        );
        assert_eq!(variance_of("variance"), variance_of("var_samp"));
        assert_eq!(variance_of("stddev_variance"), None);
    }
}
