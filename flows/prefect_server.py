"""The Prefect API a command's flow run talks to: the configured one, the one `medtune server` started,
or a temporary server of this process's own.

    url = running_server()        # PREFECT_API_URL, else the server `medtune server` recorded; None if none answers
    with prefect_api() as url:    # the same, else a temporary server for the block (`medtune retrain --once`)
        ...

Prefect is imported only inside the functions: `medtune retrain --once` answers an empty inbox before
any of this runs (flows/commands.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from components import lifetime
from components.common import StageError

log = logging.getLogger("medtune.commands")  # the commands' lines, whichever module says them

DEFAULT_API = "http://127.0.0.1:4200/api"
SERVER_RECORD = "medtune-server.json"  # under PREFECT_HOME: where `medtune server` said it listens


def server_record() -> Path:
    from prefect.settings import get_current_settings

    return Path(get_current_settings().home) / SERVER_RECORD


def running_server() -> str | None:
    """The Prefect API for this process: PREFECT_API_URL (environment or Prefect profile) when set;
    otherwise the server `medtune server` started, if it answers: the address it recorded under
    PREFECT_HOME, then the default http://127.0.0.1:4200/api. A server found that way is set as
    PREFECT_API_URL for this process and its children. None when none answers; no server is started.

    The commands import Prefect before they run (flows/serve.py, flows/retrain.py), and Prefect reads its
    settings at import, so the settings are refreshed here: without it, an environment variable set
    now is ignored and a flow run starts a temporary server of its own.
    """
    from prefect.context import refresh_global_settings_context
    from prefect.settings import get_current_settings

    refresh_global_settings_context()  # whatever the caller put into os.environ since the import
    configured = get_current_settings().api.url
    if configured:
        return configured
    candidates = []
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        candidates.append(str(json.loads(server_record().read_text())["api"]))
    for url in dict.fromkeys([*candidates, DEFAULT_API]):
        if _answers(url):
            os.environ["PREFECT_API_URL"] = url
            refresh_global_settings_context()
            return url
    return None


@contextlib.contextmanager
def prefect_api() -> Iterator[str | None]:
    """The Prefect API for a flow run in this process: the configured one (PREFECT_API_URL, in the
    environment or the Prefect profile) or the one `medtune server` started (running_server), else a
    temporary server of this process's own.

    Prefect 3 would start that temporary server itself (SubprocessASGIServer) and stop it only from
    atexit, which a `kill -9` skips: the server lived on. This starts the same server (Prefect's
    own command line) through components.lifetime, so the kernel kills it when this process dies
    however it dies, on a free 127.0.0.1 port; points PREFECT_API_URL at it for this process and its
    threads; and stops it when the block ends, normally or by an exception.
    """
    from prefect.settings import get_current_settings

    url = running_server()  # PREFECT_API_URL, or the server `medtune server` started
    settings = get_current_settings()
    if url or not settings.server.ephemeral.enabled:
        if url:
            log.info("Prefect server: %s", url)
        yield url  # a server of its own, or Prefect's error when temporary servers are off
        return
    proc, url = _start_temporary_server(settings)
    log.info("temporary Prefect server for this run on %s (pid %d); it stops with this process", url, proc.pid)
    saved = _use_api(url)
    try:
        yield url
    finally:
        _use_api(saved)
        _stop(proc)


def _start_temporary_server(settings) -> tuple[subprocess.Popen, str]:
    """Prefect's server on a free 127.0.0.1 port, bound to this process (components.lifetime):
    (the process, its API url) once it answers; StageError when three tries never do."""
    import prefect

    # Prefect 3.8's SubprocessASGIServer._run_uvicorn_command, word for word.
    env = {
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
        **settings.to_environment_variables(exclude_unset=True),
    }
    timeout = settings.server.ephemeral.startup_timeout_seconds
    proc, url = None, ""
    for _ in range(3):  # the free port can be taken between our probe and the server's bind
        port = _free_port()
        url = f"http://127.0.0.1:{port}/api"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                *lifetime.module_argv(
                    "uvicorn",
                    [
                        "--app-dir",
                        str(prefect.__module_path__.parent),
                        "--factory",
                        "prefect.server.api.server:create_app",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(port),
                        "--log-level",
                        "error",
                        "--lifespan",
                        "on",
                    ],
                ),
            ],
            env=env,
        )
        if _wait_healthy(proc, url, timeout):
            return proc, url
        _stop(proc)
    raise StageError(
        f"the temporary Prefect server did not answer on {url}/health within {timeout} s "
        f"(exit code {proc.returncode}); see its output above. Or start one (`medtune server`) "
        "and set PREFECT_API_URL=http://127.0.0.1:4200/api."
    )


def _use_api(url: str | None) -> str | None:
    """Set PREFECT_API_URL to url (None: unset it) for this process; return the value it had."""
    from prefect.context import refresh_global_settings_context

    saved = os.environ.get("PREFECT_API_URL")
    if url is None:
        os.environ.pop("PREFECT_API_URL", None)
    else:
        os.environ["PREFECT_API_URL"] = url
    # Prefect's settings were read at import; this makes every thread (the events and log workers
    # too, which do not see a temporary_settings context) use this server.
    refresh_global_settings_context()
    return saved


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str, timeout: float = 2) -> bool:
    """A Prefect API answers at `url` (its /health says true)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as r:
            return r.status == 200 and r.read().strip() == b"true"
    except (OSError, ValueError):  # URLError is an OSError
        return False


def _wait_healthy(proc: subprocess.Popen, url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if _answers(url):
            return True
        time.sleep(0.2)
    return False


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (uvicorn shuts down cleanly), SIGKILL after 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
