"""`megaportrait demo`: the whole system end to end on embedded defaults, ending in one HTML report.

Three simulated customer sites take consented people's photos through intake, train the global Identity Net adapter
together in federated DP rounds (Flower simulation, SecAgg+), personalise a private adapter per person, seal payloads
to a render node served over mutual-TLS gRPC on loopback, render portraits onto several templates (with stage
ablations), revoke one person's consent end to end, and verify every audit log.

Modules, in the order the demo runs them: `settings` (what to run), `roster` (who and which templates), `sites`
(the simulated sites and their people), `federate` (rounds and personal adapters), `render` (node and portraits),
`revoke` (revocation checks and audit verification), `report` (HTML and JSON), `run` (the whole thing, timed), `cli`.
The sites' own work (stores, consent, intake, sealed render jobs, revocation) is the customer site's code in
`megaportrait.client` (`site`, `consent_capture`, `enrolment`, `render_requests`, `revocation`), as staff run it.
Only light modules are imported here; models, Flower and gRPC load when a step runs.
"""
from __future__ import annotations

from .settings import DemoError, DemoSettings

__all__ = ["DemoError", "DemoSettings", "run_demo"]


def run_demo(settings: DemoSettings, **kwargs):
    """Run the demo; see `megaportrait.shared.demo.run.run_demo`."""
    from .run import run_demo as _run

    return _run(settings, **kwargs)
