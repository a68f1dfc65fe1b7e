"""Open the experiment's MLflow runs table: start `mlflow ui` on the config's store (or, for a tracking server,
use it) and print the link to the runs in the Model-training view. MLflow 3's UI opens in its GenAI view
unless the URL says `workflowType=machine_learning`."""

import signal
import subprocess
import sys
import time
import urllib.request

from hfprune.commands import add_config_argument
from hfprune.errors import HFPruneError
from hfprune.validation import load_config

HELP = "start the MLflow UI on the config's store and print the link to this experiment's runs table"


def add_arguments(parser):
    add_config_argument(parser)
    parser.add_argument("--port", type=int, default=5000, help="port of the UI on 127.0.0.1 (default 5000)")


def runs_url(base: str, experiment_id: str) -> str:
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def _wait_until_up(proc: subprocess.Popen, base: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise HFPruneError(f"mlflow ui exited with code {proc.returncode} before answering on {base} "
                               "(is the port taken? pass another with --port)")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise HFPruneError(f"mlflow ui did not answer on {base} within {timeout:.0f} s")


def run(args) -> int:
    from hfprune import tracking_store

    cfg = load_config(args.config)
    uri = tracking_store.tracking_uri(cfg)
    db = tracking_store.sqlite_path(uri)
    if db is not None and not db.is_file():
        raise HFPruneError(f"MLflow store {uri} does not exist yet: run the grid with tracking on first")
    store = tracking_store.Store(uri)  # an unreachable server: one line naming it
    exp = store.call("get_experiment_by_name", cfg["experiment"])
    if exp is None:
        raise HFPruneError(f"MLflow store {uri} has no experiment {cfg['experiment']!r} yet: run the grid first")
    if uri.startswith(("http://", "https://")):
        print(runs_url(uri, exp.experiment_id))
        return 0
    base = f"http://127.0.0.1:{args.port}"
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                             "--host", "127.0.0.1", "--port", str(args.port), "--workers", "1"],
                            stdout=sys.stderr)  # stdout: the link only
    # a SIGTERM to this command stops the server it started too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        _wait_until_up(proc, base)
        print(runs_url(base, exp.experiment_id), flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
