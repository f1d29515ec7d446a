"""`megaportrait health`: probe a service's health (for container HEALTHCHECKs) and bridge Flower's gRPC health.

Flower's SuperLink and SuperNode expose only a gRPC health service (`--health-server-address`); `bridge` turns it
into the same `/healthz` + `/metrics` every MegaPortrait service serves, so one Prometheus job and one probe style
cover all three roles. Only typer-level code runs at import.
"""
from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(help="Health probes and the Flower health bridge.", no_args_is_help=True)


@app.command()
def probe(
    target: Annotated[str, typer.Argument(help="http://host:port/healthz or grpc://host:port[/service].")],
    timeout: Annotated[float, typer.Option(help="Seconds to wait for an answer.")] = 3.0,
) -> None:
    """Exit 0 when the target is healthy, 1 (and say why on stderr) when not."""
    from .service_health import HealthEndpointError
    from .service_health import probe as _probe

    try:
        typer.echo(_probe(target, timeout=timeout))
    except HealthEndpointError as exc:
        typer.echo(f"unhealthy: {exc}", err=True)
        raise typer.Exit(1) from None


@app.command()
def bridge(
    upstream: Annotated[str, typer.Option(help="What to watch: grpc://127.0.0.1:9098 (Flower) or an http URL.")],
    listen: Annotated[str, typer.Option(help="host:port to serve /healthz and /metrics on.")] = "127.0.0.1:9464",
    service: Annotated[str, typer.Option(help="Name in megaportrait_build_info and logs, e.g. superlink.")] = "flower",
) -> None:
    """Serve /healthz (healthy while the upstream is) and /metrics (upstream up/latency, process) until stopped."""
    import time

    from prometheus_client import Gauge

    from . import service_health
    from .logs import configure_logging

    configure_logging()
    registry = service_health.new_registry(service)
    up = Gauge("megaportrait_upstream_up", "1 when the watched upstream answered healthy at the last probe.", ["upstream"], registry=registry)
    latency = Gauge("megaportrait_upstream_probe_seconds", "Duration of the last upstream probe.", ["upstream"], registry=registry)

    def upstream_healthy() -> None:
        started = time.monotonic()
        try:
            service_health.probe(upstream, timeout=2.0)
        except service_health.HealthEndpointError:
            up.labels(upstream).set(0)
            raise
        finally:
            latency.labels(upstream).set(time.monotonic() - started)
        up.labels(upstream).set(1)

    try:
        server = service_health.start(listen, registry, service=service, checks={"upstream": upstream_healthy})
    except service_health.HealthEndpointError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{service}: /healthz and /metrics on {server.url}, watching {upstream}")
    service_health.wait_until_terminated()
    server.stop()
