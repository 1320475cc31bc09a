//! Resource attributes: who is reporting. `service.name=fanout`, `host.name`, and the
//! Kubernetes node and pod when the usual downward-API variables are set, plus anything in
//! `OTEL_RESOURCE_ATTRIBUTES` (which `OTEL_SERVICE_NAME` overrides for service.name).

use crate::metrics::{AttrValue, Attributes};

/// Downward-API variables commonly set in a DaemonSet, and the attribute each becomes.
const K8S_ENV: [(&str, &str); 4] = [
    ("K8S_NODE_NAME", "k8s.node.name"),
    ("K8S_POD_NAME", "k8s.pod.name"),
    ("K8S_NAMESPACE_NAME", "k8s.namespace.name"),
    ("K8S_POD_UID", "k8s.pod.uid"),
];

fn static_key(key: &str) -> &'static str {
    // Attribute keys are few and fixed for the agent's lifetime; leaking them once is bounded.
    Box::leak(key.to_string().into_boxed_str())
}

pub fn detect(env: &dyn Fn(&str) -> Option<String>, hostname: Option<String>) -> Attributes {
    let mut attrs: Attributes = Vec::new();
    let mut set = |key: &'static str, value: String| {
        attrs.retain(|(k, _)| *k != key);
        attrs.push((key, AttrValue::Str(value)));
    };
    set("service.name", "fanout".into());
    set("service.version", env!("CARGO_PKG_VERSION").into());
    if let Some(host) = hostname {
        set("host.name", host);
    }
    // The spec's aliases first, then the names this project's manifests use.
    for (var, key) in [
        ("NODE_NAME", "k8s.node.name"),
        ("POD_NAME", "k8s.pod.name"),
        ("POD_NAMESPACE", "k8s.namespace.name"),
    ]
    .into_iter()
    .chain(K8S_ENV)
    {
        if let Some(v) = env(var).filter(|v| !v.is_empty()) {
            set(key, v);
        }
    }
    if let Some(list) = env("OTEL_RESOURCE_ATTRIBUTES") {
        for pair in list.split(',') {
            if let Some((k, v)) = pair.split_once('=') {
                let (k, v) = (k.trim(), v.trim());
                if !k.is_empty() {
                    set(static_key(k), v.to_string());
                }
            }
        }
    }
    if let Some(name) = env("OTEL_SERVICE_NAME").filter(|v| !v.is_empty()) {
        set("service.name", name);
    }
    attrs
}

/// The kernel's host name (`uname -n`).
pub fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get<'a>(attrs: &'a Attributes, key: &str) -> Option<&'a AttrValue> {
        attrs.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    #[test]
    fn service_host_and_kubernetes_attributes() {
        let env = |k: &str| match k {
            "K8S_NODE_NAME" => Some("node-1".to_string()),
            "K8S_POD_NAME" => Some("fanout-abc".to_string()),
            _ => None,
        };
        let attrs = detect(&env, Some("box".into()));
        assert_eq!(
            get(&attrs, "service.name"),
            Some(&AttrValue::from("fanout"))
        );
        assert_eq!(get(&attrs, "host.name"), Some(&AttrValue::from("box")));
        assert_eq!(
            get(&attrs, "k8s.node.name"),
            Some(&AttrValue::from("node-1"))
        );
        assert_eq!(
            get(&attrs, "k8s.pod.name"),
            Some(&AttrValue::from("fanout-abc"))
        );
    }

    #[test]
    fn no_kubernetes_attributes_outside_kubernetes() {
        let attrs = detect(&|_| None, None);
        assert!(get(&attrs, "k8s.node.name").is_none());
        assert!(get(&attrs, "host.name").is_none());
    }

    #[test]
    fn otel_resource_attributes_and_service_name_override() {
        let env = |k: &str| match k {
            "OTEL_RESOURCE_ATTRIBUTES" => {
                Some("deployment.environment=prod, service.name=x".to_string())
            }
            "OTEL_SERVICE_NAME" => Some("fanout-eu".to_string()),
            _ => None,
        };
        let attrs = detect(&env, None);
        assert_eq!(
            get(&attrs, "deployment.environment"),
            Some(&AttrValue::from("prod"))
        );
        assert_eq!(
            get(&attrs, "service.name"),
            Some(&AttrValue::from("fanout-eu"))
        );
        assert_eq!(
            attrs.iter().filter(|(k, _)| *k == "service.name").count(),
            1
        );
    }
}
