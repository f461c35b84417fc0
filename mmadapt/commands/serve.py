"""``mmadapt serve --checkpoint OUT``: the web demo (composition, image chat, speech chat) on a local port."""

from __future__ import annotations

import argparse
import signal
import socket
import tempfile
from pathlib import Path

from ..errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="OUT", help="a training output folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860, metavar="N", help="port to listen on")


def run(args: argparse.Namespace) -> None:
    """Load the run, then serve the demo until Ctrl-C or SIGTERM."""
    from ..inference.chat import ChatSession

    _check_port(args.host, args.port)  # before the model loads, so a busy port fails at once
    loaded = ChatSession.from_run(args.checkpoint)
    try:
        from ..inference.serve import Backend, build_demo, launch
    except ModuleNotFoundError as error:
        if error.name != "gradio":
            raise
        raise InputError("serve needs gradio: pip install 'mmadapt[demo]'") from None
    with tempfile.TemporaryDirectory(prefix="mmadapt-serve-") as workspace:
        backend = Backend(loaded.model, loaded.system_prompt, str(args.checkpoint), Path(workspace))
        # SIGTERM stops the server as Ctrl-C does, so the workspace is removed on the way out.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        launch(build_demo(backend), backend.workspace, args.host, args.port)


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        # The server sets SO_REUSEADDR too, so a port in TIME_WAIT counts as free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            problem = f"serve: cannot listen on {host}:{port} ({error.strerror}); choose another --port"
            raise InputError(problem) from None
