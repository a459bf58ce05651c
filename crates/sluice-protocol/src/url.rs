//! Showing URLs that may carry credentials.

use std::borrow::Cow;

/// `url` with the `user:pass@` of its authority replaced by `***@`, for showing it (in
/// `Debug` output, logs and messages): a base URL given as `http://user:secret@host/` must not
/// print its secret.
pub fn without_userinfo(url: &str) -> Cow<'_, str> {
    let Some(scheme_end) = url.find("://") else {
        return url.into();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}***{}", &url[..scheme_end + 3], &rest[at..]).into(),
        None => url.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_is_hidden() {
        for (url, shown) in [
            ("http://u:p@h:1/v1", "http://***@h:1/v1"),
            ("http://u@h/v1?x=a@b", "http://***@h/v1?x=a@b"),
            ("http://h:1/v1/a@b", "http://h:1/v1/a@b"),
            ("https://a@b:c@h", "https://***@h"),
            ("not a url @", "not a url @"),
        ] {
            assert_eq!(without_userinfo(url), shown, "{url}");
        }
    }
}
