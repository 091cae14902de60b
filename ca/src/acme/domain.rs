//! Registered domains, from the public suffix list: what ACME rate limits
//! count by, and the zone a DNS-01 update goes to when none is configured.

/// The registered domain of `name` (`shop.example.co.uk` → `example.co.uk`);
/// `name` itself when it has none (a single label, or a public suffix).
pub fn registered_domain(name: &str) -> String {
    let name = name.trim_start_matches("*.").trim_end_matches('.').to_ascii_lowercase();
    psl::domain_str(&name).map_or_else(|| name.clone(), str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_domains_follow_the_public_suffix_list() {
        assert_eq!(registered_domain("a.b.example.com"), "example.com");
        assert_eq!(registered_domain("*.example.com"), "example.com");
        assert_eq!(registered_domain("example.com."), "example.com");
        assert_eq!(registered_domain("shop.example.co.uk"), "example.co.uk");
        assert_eq!(registered_domain("www.Example.Test"), "example.test");
        assert_eq!(registered_domain("app.github.io"), "app.github.io");
        assert_eq!(registered_domain("localhost"), "localhost");
    }
}
