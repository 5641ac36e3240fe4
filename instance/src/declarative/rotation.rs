//! Password rotation without client errors (pure decisions): the role is a group; two login
//! roles `<role>_a` / `<role>_b` take turns. The Secret names one of them; a rotation gives the
//! other a new password, then points the Secret at it; the previous one expires after a grace
//! period (`VALID UNTIL`, enforced by PostgreSQL itself), so an application that reads the Secret
//! when it connects never meets credentials that do not work.

use chrono::{DateTime, Utc};

/// The two login roles of `role`.
pub fn login_roles(role: &str) -> [String; 2] {
    [format!("{role}_a"), format!("{role}_b")]
}

/// The login role the Secret names now (the first one when the Secret names neither).
pub fn active_login(role: &str, secret_username: Option<&str>) -> String {
    let [first, second] = login_roles(role);
    match secret_username {
        Some(name) if name == second => second,
        _ => first,
    }
}

/// The other login role.
pub fn idle_login(role: &str, active: &str) -> String {
    let [first, second] = login_roles(role);
    if active == first { second } else { first }
}

/// Whether to rotate now: a rotate-password annotation not yet handled, or a password older than
/// `rotation_days`. Never before the first password was set.
pub fn rotation_due(
    password_set_at: Option<DateTime<Utc>>,
    rotation_days: i32,
    now: DateTime<Utc>,
    requested: Option<&str>,
    handled: Option<&str>,
) -> bool {
    let Some(set_at) = password_set_at else {
        return false;
    };
    let asked = requested.is_some_and(|token| Some(token) != handled);
    asked || now - set_at >= chrono::Duration::days(i64::from(rotation_days))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_roles_take_turns() {
        assert_eq!(active_login("app", None), "app_a");
        assert_eq!(active_login("app", Some("app")), "app_a");
        assert_eq!(active_login("app", Some("app_b")), "app_b");
        assert_eq!(idle_login("app", "app_a"), "app_b");
        assert_eq!(idle_login("app", "app_b"), "app_a");
    }

    #[test]
    fn rotation_is_due_on_age_or_on_a_new_request() {
        let now = Utc::now();
        let day = chrono::Duration::days(1);
        assert!(
            !rotation_due(None, 1, now, Some("x"), None),
            "no password yet"
        );
        assert!(!rotation_due(Some(now - day / 2), 1, now, None, None));
        assert!(rotation_due(Some(now - day), 1, now, None, None));
        assert!(rotation_due(Some(now), 30, now, Some("t1"), None));
        assert!(!rotation_due(Some(now), 30, now, Some("t1"), Some("t1")));
        assert!(rotation_due(Some(now), 30, now, Some("t2"), Some("t1")));
    }
}
