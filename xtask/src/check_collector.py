"""Checks an OpenTelemetry Collector config without a collector (none can be installed here):
every pipeline component must be defined, the OTLP receiver must accept gRPC and HTTP, and the
metrics pipeline must end in a Prometheus remote-write exporter."""
import sys
import yaml

config = yaml.safe_load(open(sys.argv[1]))
errors = []
pipelines = config.get("service", {}).get("pipelines", {})
if "metrics" not in pipelines:
    errors.append("no metrics pipeline")
for name, pipeline in pipelines.items():
    for kind in ("receivers", "processors", "exporters"):
        for component in pipeline.get(kind, []):
            if component not in (config.get(kind) or {}):
                errors.append(f"pipeline {name}: {kind[:-1]} {component!r} is not defined")
protocols = ((config.get("receivers") or {}).get("otlp") or {}).get("protocols") or {}
for protocol in ("grpc", "http"):
    if protocol not in protocols:
        errors.append(f"the otlp receiver does not accept {protocol}")
if not any(e.split("/")[0] == "prometheusremotewrite" for e in pipelines.get("metrics", {}).get("exporters", [])):
    errors.append("the metrics pipeline does not export with prometheusremotewrite")
if errors:
    print("\n".join(errors))
    sys.exit(1)
