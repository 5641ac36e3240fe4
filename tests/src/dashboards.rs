//! The Grafana dashboards of `deploy/grafana/dashboards/` as tests see them: every PromQL query
//! of a dashboard (panel targets and variable queries), the metric names a query reads, the
//! metric names an exposition declares, and the structural rules of grafana/dashboard-linter
//! (which does not install from the Go module proxy), applied by [`lint`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde_json::Value;

use crate::paths;

/// Folder of the dashboards, the source the chart and the kustomize folder are generated from.
pub fn folder() -> PathBuf {
    paths::workspace_root()
        .join("deploy")
        .join("grafana")
        .join("dashboards")
}

/// The dashboard `<name>.json`, parsed.
pub fn load(name: &str) -> Value {
    let path = folder().join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("reading {}: {error}", path.display()));
    serde_json::from_str(&text)
        .unwrap_or_else(|error| panic!("parsing {}: {error}", path.display()))
}

/// Names (without `.json`) of every dashboard in [`folder`], sorted.
pub fn names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(folder())
        .expect("deploy/grafana/dashboards exists")
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().to_string_lossy().to_string();
            Some(name.strip_suffix(".json")?.to_string())
        })
        .collect();
    names.sort();
    names
}

/// The metrics of a pooler pod the pooler dashboard may read: pgbouncer_exporter's names (from
/// PgBouncer's `SHOW POOLS`, `SHOW STATS` and `SHOW CONFIG`), kept so that its dashboards keep
/// working. The pooler's exporter is being written on its own branch; until its `/metrics` can be
/// scraped here, the pooler dashboard is checked against this list.
pub const POOLER_METRICS: &[&str] = &[
    "pgbouncer_up",
    "pgbouncer_config_max_client_connections",
    "pgbouncer_pools_client_active_connections",
    "pgbouncer_pools_client_waiting_connections",
    "pgbouncer_pools_client_maxwait_seconds",
    "pgbouncer_pools_server_active_connections",
    "pgbouncer_pools_server_idle_connections",
    "pgbouncer_pools_server_used_connections",
    "pgbouncer_stats_queries_pooled_total",
    "pgbouncer_stats_sql_transactions_pooled_total",
    "pgbouncer_stats_queries_duration_seconds_total",
    "pgbouncer_stats_client_wait_seconds_total",
    "pgbouncer_stats_received_bytes_total",
    "pgbouncer_stats_sent_bytes_total",
];

/// One PromQL query of a dashboard: where it is (panel title or variable name) and its text.
#[derive(Clone, Debug)]
pub struct Query {
    /// `panel "<title>"` or `variable "<name>"`.
    pub place: String,
    /// The PromQL, with Grafana's variables still in it.
    pub expr: String,
}

fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut all = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        all.push(panel);
        all.extend(panel["panels"].as_array().into_iter().flatten());
    }
    all
}

/// Every PromQL query of `dashboard`: the panels' targets, and the query variables' queries
/// (`label_values(<selector>, label)` gives its selector).
pub fn queries(dashboard: &Value) -> Vec<Query> {
    let mut queries = Vec::new();
    for panel in panels(dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                queries.push(Query {
                    place: format!("panel {:?}", panel["title"].as_str().unwrap_or_default()),
                    expr: expr.to_string(),
                });
            }
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if variable["type"] != "query" {
            continue;
        }
        let text = variable["query"]["query"]
            .as_str()
            .or_else(|| variable["query"].as_str())
            .unwrap_or_default();
        let expr = match text.strip_prefix("label_values(") {
            Some(rest) => match rest.rsplit_once(',') {
                Some((selector, _label)) => selector.to_string(),
                None => continue,
            },
            None => text
                .strip_prefix("query_result(")
                .and_then(|rest| rest.strip_suffix(')'))
                .unwrap_or(text)
                .to_string(),
        };
        queries.push(Query {
            place: format!(
                "variable {:?}",
                variable["name"].as_str().unwrap_or_default()
            ),
            expr,
        });
    }
    queries
}

/// PromQL words that are not metric names when they stand alone (operators, modifiers, and the
/// aggregations, which may come before their `by (...)` instead of a parenthesis).
const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
    "atan2",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

/// Keywords followed by a parenthesised list of label names.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Index just past the character that closes the one at `start` (`"`, `'`, `` ` ``, `{`, `[`,
/// `(`), skipping quoted text inside brackets.
fn skip_closing(chars: &[char], start: usize) -> usize {
    let open = chars[start];
    let close = match open {
        '{' => '}',
        '[' => ']',
        '(' => ')',
        quote => quote,
    };
    let quoted = matches!(open, '"' | '\'' | '`');
    let mut index = start + 1;
    while index < chars.len() {
        let c = chars[index];
        if quoted {
            if c == '\\' && open != '`' {
                index += 2;
                continue;
            }
            if c == close {
                return index + 1;
            }
        } else if matches!(c, '"' | '\'' | '`') {
            index = skip_closing(chars, index);
            continue;
        } else if c == close {
            return index + 1;
        }
        index += 1;
    }
    chars.len()
}

/// The metric names `expr` reads: identifiers that are not functions, keywords, label names
/// (inside `{...}`, `by (...)`, ...), durations, numbers or Grafana variables.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut index = 0;
    while index < chars.len() {
        let c = chars[index];
        if matches!(c, '"' | '\'' | '`' | '{' | '[') {
            index = skip_closing(&chars, index);
        } else if c == '#' {
            while index < chars.len() && chars[index] != '\n' {
                index += 1;
            }
        } else if c == '$' {
            // A Grafana variable: `$name`, `${name}` or `${name:format}`.
            index += 1;
            if chars.get(index) == Some(&'{') {
                index = skip_closing(&chars, index);
            } else {
                while index < chars.len()
                    && (chars[index].is_ascii_alphanumeric() || chars[index] == '_')
                {
                    index += 1;
                }
            }
        } else if c.is_ascii_digit() || c == '.' {
            // Numbers and durations (`0.99`, `1e9`, `0x1f`, `5m`).
            while index < chars.len()
                && (chars[index].is_ascii_alphanumeric() || chars[index] == '.')
            {
                index += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = index;
            while index < chars.len()
                && (chars[index].is_ascii_alphanumeric() || matches!(chars[index], '_' | ':'))
            {
                index += 1;
            }
            let word: String = chars[start..index].iter().collect();
            let mut next = index;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let followed_by_paren = chars.get(next) == Some(&'(');
            let lower = word.to_ascii_lowercase();
            if LABEL_LISTS.contains(&lower.as_str()) {
                if followed_by_paren {
                    index = skip_closing(&chars, next);
                }
            } else if KEYWORDS.contains(&lower.as_str()) || followed_by_paren {
                // A keyword or a function call.
            } else {
                names.insert(word);
            }
        } else {
            index += 1;
        }
    }
    names
}

/// Sample names an exposition (Prometheus text or OpenMetrics) declares or holds: for each
/// `# TYPE` line the names its samples carry (`_total` of a counter, `_bucket`/`_sum`/`_count` of
/// a histogram, ...), whether or not a sample was written yet, and the name of every sample line.
pub fn exported_names(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        if let Some(declaration) = line.strip_prefix("# TYPE ") {
            let mut parts = declaration.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total", "_created"],
                "histogram" | "gaugehistogram" => &["_bucket", "_sum", "_count", "_created"],
                "summary" => &["", "_sum", "_count", "_created"],
                "info" => &["_info"],
                _ => &[""],
            };
            for suffix in suffixes {
                names.insert(format!("{name}{suffix}"));
            }
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

/// Every metric `dashboard` queries that is not in `exported`: `(place, metric)` pairs.
pub fn unexported(dashboard: &Value, exported: &BTreeSet<String>) -> Vec<(String, String)> {
    let mut missing = Vec::new();
    for query in queries(dashboard) {
        for name in metric_names(&query.expr) {
            if !exported.contains(&name) {
                missing.push((query.place.clone(), name));
            }
        }
    }
    missing
}

/// The PromQL of a query with Grafana's variables replaced by values PromQL accepts, for a
/// parser (`promtool check rules`): range variables by durations, other variables by a word.
pub fn promql_for_parser(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
        .replace("${", "{")
        .replace('$', "v_")
}

fn datasource_uid(value: &Value) -> Option<&str> {
    value["datasource"]["uid"]
        .as_str()
        .or_else(|| value["datasource"].as_str())
}

/// dashboard-linter's rules, applied to one dashboard: what breaks them, one line each.
/// - template-datasource-rule: a `datasource` variable of type `datasource` for Prometheus;
/// - panel-datasource-rule / target-datasource: every panel, target and query variable uses it;
/// - target-rate-interval-rule: `rate`, `irate` and `increase` over `$__rate_interval` (or
///   `$__range` in an instant query);
/// - panel-title-description-rule, panel-units-rule: a title, a description and a unit on every
///   graph, stat and table;
/// - unique panel ids, a uid and a title, panels inside the 24-column grid and not overlapping.
pub fn lint(dashboard: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    for key in ["uid", "title"] {
        if dashboard[key].as_str().is_none_or(str::is_empty) {
            problems.push(format!("the dashboard has no {key}"));
        }
    }
    let variables = dashboard["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let has_datasource = variables.iter().any(|variable| {
        variable["name"] == "datasource"
            && variable["type"] == "datasource"
            && variable["query"] == "prometheus"
    });
    if !has_datasource {
        problems.push("no `datasource` variable of type datasource for prometheus".to_string());
    }
    let uses_variable = |uid: Option<&str>| matches!(uid, Some("${datasource}" | "$datasource"));
    for variable in variables
        .iter()
        .filter(|variable| variable["type"] == "query")
    {
        if !uses_variable(datasource_uid(variable)) {
            problems.push(format!(
                "variable {} does not use $datasource",
                variable["name"]
            ));
        }
    }
    let mut ids = BTreeSet::new();
    let mut cells: BTreeMap<(i64, i64), String> = BTreeMap::new();
    for panel in panels(dashboard) {
        let title = panel["title"].as_str().unwrap_or_default().to_string();
        if !ids.insert(panel["id"].as_i64().unwrap_or(-1)) {
            problems.push(format!("panel {title:?}: id {} is not unique", panel["id"]));
        }
        let grid = &panel["gridPos"];
        let (x, y, w, h) = (
            grid["x"].as_i64().unwrap_or(-1),
            grid["y"].as_i64().unwrap_or(-1),
            grid["w"].as_i64().unwrap_or(0),
            grid["h"].as_i64().unwrap_or(0),
        );
        if x < 0 || y < 0 || w <= 0 || h <= 0 || x + w > 24 {
            problems.push(format!(
                "panel {title:?}: gridPos {grid} is outside the grid"
            ));
        }
        for cell_x in x..x + w {
            for cell_y in y..y + h {
                if let Some(other) = cells.insert((cell_x, cell_y), title.clone()) {
                    problems.push(format!("panel {title:?} overlaps panel {other:?}"));
                }
            }
        }
        if panel["type"] == "row" {
            continue;
        }
        if title.is_empty() || panel["description"].as_str().is_none_or(str::is_empty) {
            problems.push(format!(
                "panel {title:?}: a title and a description are required"
            ));
        }
        if panel["fieldConfig"]["defaults"]["unit"]
            .as_str()
            .is_none_or(str::is_empty)
        {
            problems.push(format!("panel {title:?}: no unit"));
        }
        if !uses_variable(datasource_uid(panel)) {
            problems.push(format!(
                "panel {title:?}: datasource is not ${{datasource}}"
            ));
        }
        let targets = panel["targets"].as_array().cloned().unwrap_or_default();
        if targets.is_empty() {
            problems.push(format!("panel {title:?}: no query"));
        }
        for target in &targets {
            if !uses_variable(datasource_uid(target)) {
                problems.push(format!(
                    "panel {title:?}: a target's datasource is not ${{datasource}}"
                ));
            }
            let expr = target["expr"].as_str().unwrap_or_default();
            let instant = target["instant"] == true;
            for function in ["rate(", "irate(", "increase("] {
                for (position, _) in expr.match_indices(function) {
                    let preceded_by_word = expr[..position]
                        .chars()
                        .last()
                        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
                    if preceded_by_word {
                        continue;
                    }
                    let rest = &expr[position..];
                    let range = rest.find('[').map(|start| &rest[start..]);
                    let good = range.is_some_and(|range| {
                        range.starts_with("[$__rate_interval]")
                            || (instant && range.starts_with("[$__range]"))
                    });
                    if !good {
                        problems.push(format!(
                            "panel {title:?}: {function}...) must range over $__rate_interval: {expr}"
                        ));
                    }
                }
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(expr: &str) -> Vec<String> {
        metric_names(expr).into_iter().collect()
    }

    #[test]
    fn metric_names_skip_functions_labels_keywords_variables_and_numbers() {
        assert_eq!(
            names(
                "sum by (pod, le) (rate(pg_a_total{namespace=\"$namespace\", x=~\"a|b\"}[$__rate_interval])) \
                 / on (pod) group_left(role) pg_b * 1e3 > bool 0.5 unless pg_c offset 5m"
            ),
            ["pg_a_total", "pg_b", "pg_c"]
        );
        assert_eq!(
            names("histogram_quantile(0.99, sum without (x) (rate(h_bucket[${__range}])))"),
            ["h_bucket"]
        );
        assert_eq!(names("time() - max(ts{a=\"}\"})"), ["ts"]);
    }

    #[test]
    fn exported_names_follow_the_declared_types() {
        let text = "# TYPE a counter\n# TYPE b histogram\n# TYPE c gauge\n# TYPE d unknown\nd 1\ne_total{x=\"y\"} 2\n# EOF\n";
        let names = exported_names(text);
        for name in [
            "a_total", "b_bucket", "b_sum", "b_count", "c", "d", "e_total",
        ] {
            assert!(names.contains(name), "{name}: {names:?}");
        }
        assert!(!names.contains("a"));
    }

    #[test]
    fn lint_finds_a_missing_datasource_a_fixed_rate_range_and_a_panel_without_unit() {
        let dashboard = serde_json::json!({
            "uid": "u", "title": "t",
            "templating": {"list": []},
            "panels": [{
                "id": 1, "type": "timeseries", "title": "p", "description": "d",
                "gridPos": {"x": 0, "y": 0, "w": 12, "h": 8},
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "fieldConfig": {"defaults": {}},
                "targets": [{"datasource": {"uid": "${datasource}"}, "expr": "rate(x_total[5m])"}]
            }]
        });
        let problems = lint(&dashboard).join("\n");
        assert!(problems.contains("no `datasource` variable"), "{problems}");
        assert!(problems.contains("$__rate_interval"), "{problems}");
        assert!(problems.contains("no unit"), "{problems}");
    }
}
