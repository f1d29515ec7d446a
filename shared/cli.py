"""The `megaportrait` command: one sub-command group per role.

Each role's commands live beside the role's code and are attached here lazily, so `megaportrait --help` stays
fast and no role imports another's heavy dependencies.
"""
from __future__ import annotations

import typer

app = typer.Typer(help="MegaPortrait: private, personalised portraits.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False)  # locals may hold keys or personal data


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", envvar="MEGAPORTRAIT_VERBOSE",
                                      help="Also show third-party libraries' start-up lines (protobuf, TF Lite, "
                                           "absl, OpenCV, Ray), hidden by default.")) -> None:
    """Roles: client (customer site), coordinator (Flower), render-node, audit; and the end-to-end demo."""
    if not verbose:
        from .logs import quiet_third_party

        quiet_third_party()


@app.command()
def version() -> None:
    """Print the installed version."""
    from importlib.metadata import version as _v

    typer.echo(_v("megaportrait"))


from .audit_cli import app as _audit_app  # noqa: E402 - typer-level only; heavy imports live inside its commands

app.add_typer(_audit_app, name="audit")

from megaportrait.server.render.cli import app as _render_node_app  # noqa: E402 - typer-level only

app.add_typer(_render_node_app, name="render-node")

from .health_cli import app as _health_app  # noqa: E402 - typer-level only
from .pki_cli import app as _pki_app  # noqa: E402 - typer-level only

app.add_typer(_pki_app, name="pki")
app.add_typer(_health_app, name="health")

from megaportrait.client.cli import client as _client_app  # noqa: E402 - typer-level only
from megaportrait.server.coordinator.cli import coordinator as _coordinator_app  # noqa: E402 - typer-level only

app.add_typer(_client_app, name="client")
app.add_typer(_coordinator_app, name="coordinator")

from .evaluation.cli import eval_command as _eval_command  # noqa: E402 - typer-level only

app.command("eval")(_eval_command)

from .demo.cli import demo_command as _demo_command  # noqa: E402 - typer-level only

app.command("demo")(_demo_command)
