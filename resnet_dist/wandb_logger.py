"""W&B on rank 0: one run per job, continued across resumes and requeues, never fatal, never holding the key.

Mode (`log.wandb.mode`, `WANDB_MODE` in the environment wins): `auto` is online when an API key is
configured (WANDB_API_KEY, or a netrc entry for the W&B host) and offline otherwise. Online mode that
cannot reach the server (no network, bad key, init timeout) becomes one warning line and an offline run
with the same id, which `wandb sync` uploads later. A logging error later on is one warning, then W&B is
off for the rest of the run: training never stops for it.

W&B steps are the trainer's global steps. Step records log as they are (train/loss, train/acc, lr,
images_per_s, ...). Epoch records log test/* as they are, and the epoch's train means as
train/epoch_loss and train/epoch_acc (so they do not overwrite the interval values logged at the same
step), plus the test confusion matrix (a W&B confusion-matrix chart) and a few misclassified test images.
With `log.wandb.log_model`, a finished run also logs its exported weights and model card as a model artifact.
"""

from __future__ import annotations

import logging
import netrc
import os
import secrets
import shutil
import socket
import string
from pathlib import Path
from urllib.parse import urlparse

from .errors import first_line
from .fashion_mnist import CLASSES
from .loggers import EpochMedia, NullLogger, scalars

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.wandb.ai"


def warn(msg: str, env=os.environ) -> None:
    """One line on stderr, with the API key (should any library put it in a message) masked."""
    key = env.get("WANDB_API_KEY")
    if key:
        msg = msg.replace(key, "***")
    log.warning(msg)


def one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {first_line(e)}"


def api_key_configured(env=os.environ) -> bool:
    """True when wandb would find a key: WANDB_API_KEY or a netrc entry for the W&B host."""
    if env.get("WANDB_API_KEY"):
        return True
    host = urlparse(env.get("WANDB_BASE_URL") or DEFAULT_BASE_URL).hostname
    path = env.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        auth = netrc.netrc(path).authenticators(host) if host and os.path.isfile(path) else None
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def resolve_mode(requested: str, env=os.environ) -> str:
    """online / offline / disabled: WANDB_MODE wins, then `log.wandb.mode`; `auto` asks for a key."""
    forced = env.get("WANDB_MODE", "").strip().lower()
    forced = {"dryrun": "offline", "run": "online"}.get(forced, forced)
    mode = forced if forced in ("online", "offline", "disabled") else requested
    if mode == "auto":
        mode = "online" if api_key_configured(env) else "offline"
    return mode


def unreachable(env=os.environ, timeout_s: float = 5.0) -> str | None:
    """Why the W&B server cannot be reached, or None. A plain TCP connect: a machine without network
    fails here in milliseconds instead of in wandb.init's retries. Behind a proxy the proxy decides."""
    if any(env.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return None
    url = urlparse(env.get("WANDB_BASE_URL") or DEFAULT_BASE_URL)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        return f"cannot reach the W&B server {host}:{port} ({e.strerror or type(e).__name__})"
    return None


def new_run_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def start(cfg, run_dir: Path, run_name: str, run_id: str | None = None, env=os.environ):
    """A WandbLogger writing under `run_dir/wandb/`, continuing `run_id` if given; None when W&B is off."""
    mode = resolve_mode(cfg.log.wandb.mode, env)
    if mode == "disabled":
        return None
    try:
        import wandb

        wandb.setup(settings=wandb.Settings(silent=True))  # our own lines below say what matters
    except Exception as e:  # noqa: BLE001 - a broken install must not stop training
        warn(f"W&B is off for this run: {one_line(e)}", env)
        return None
    w = cfg.log.wandb
    # under `wandb agent` (a sweep) the agent chose the run: attach to it rather than to our own id
    run_id = env.get("WANDB_RUN_ID") or run_id or new_run_id()
    kwargs = dict(
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        project=w.project,
        entity=w.entity,
        # a job array (a sweep) is one group; a plain job its own
        group=w.group or env.get("SLURM_ARRAY_JOB_ID") or env.get("SLURM_JOB_ID") or run_name,
        name=w.name or run_name,
        tags=list(w.tags) or None,
        config=cfg.to_dict(),
    )
    failed = None
    if mode == "online":
        failed = unreachable(env, min(5.0, w.init_timeout_s))
        if failed is None:
            try:
                run = wandb.init(
                    mode="online",
                    settings=wandb.Settings(init_timeout=w.init_timeout_s, silent=True),
                    **kwargs,
                )
                log.info(f"wandb: online run {run.url}")
                return WandbLogger(run, offline=False)
            except Exception as e:  # noqa: BLE001 - no network, bad key, timeout: all mean "log offline"
                failed = one_line(e)
                discard_failed_run(wandb, run_dir, run_id)
    try:
        run = wandb.init(mode="offline", settings=wandb.Settings(silent=True), **kwargs)
    except Exception as e:  # noqa: BLE001
        warn(f"W&B is off for this run: {failed + '; then ' if failed else ''}{one_line(e)}", env)
        return None
    if failed:
        warn(f"W&B online logging failed ({failed}); logging offline to {Path(run.dir).parent} instead", env)
    else:
        log.info(f"wandb: logging offline to {Path(run.dir).parent}")
    return WandbLogger(run, offline=True)


def discard_failed_run(wandb, run_dir: Path, run_id: str) -> None:
    """Stop wandb's service (it still holds the failed run's id) and remove the failed run's folder."""
    try:
        wandb.teardown()
    except Exception:  # noqa: BLE001
        pass
    for d in (run_dir / "wandb").glob(f"run-*-{run_id}"):
        shutil.rmtree(d, ignore_errors=True)


class WandbLogger(NullLogger):
    """Sends the trainer's records to one W&B run, with each epoch's confusion matrix and misclassified images."""

    wants_examples = True

    def __init__(self, run, offline: bool):
        self.run, self.offline = run, offline
        self.id = run.id
        self.sync_dir = Path(run.dir).parent  # .../wandb/offline-run-<time>-<id>

    def log(self, record: dict, media: EpochMedia | None = None) -> None:
        if self.run is None:
            return
        try:
            data = scalars(record)
            if media is not None:
                data.update(self.epoch_media(media))
            self.run.log(data, step=record["step"])
        except Exception as e:  # noqa: BLE001 - logging must never stop training
            warn(f"W&B logging failed ({one_line(e)}); W&B is off for the rest of this run")
            self.run = None

    @staticmethod
    def epoch_media(media: EpochMedia) -> dict:
        import wandb

        conf, n = media.confusion, len(media.confusion)
        rows = [[CLASSES[i], CLASSES[j], conf[i][j]] for i in range(n) for j in range(n)]
        table = wandb.Table(columns=["Actual", "Predicted", "nPredictions"], data=rows)
        out = {
            "test/confusion": wandb.plot_table(
                "wandb/confusion_matrix/v1",
                table,
                {"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"},
                {"title": f"Test confusion matrix, epoch {media.epoch + 1}"},
            )
        }
        if media.misclassified:
            out["test/misclassified"] = [
                wandb.Image(img, caption=f"true: {CLASSES[y]} / predicted: {CLASSES[p]}")
                for img, y, p in media.misclassified
            ]
        return out

    def log_model(self, folder: Path, step: int, metadata: dict) -> bool:
        """Log the files of `folder` as a version of the run's W&B model artifact `model-<run id>` (a resumed
        run adds a version), aliased `step-<step>`; offline, its files wait in W&B's staging folder for
        `wandb sync`. Never fatal: False and one warning when W&B refuses."""
        if self.run is None:
            return False
        try:
            import wandb

            artifact = wandb.Artifact(
                f"model-{self.id}",
                type="model",
                description="ResNet-18 on Fashion-MNIST: weights (safetensors) and model card (json)",
                metadata=metadata,
            )
            for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
                artifact.add_file(str(path), name=path.name)
            self.run.log_artifact(artifact, aliases=["latest", f"step-{step}"])
        except Exception as e:  # noqa: BLE001 - the run's result is on disk either way
            warn(f"W&B could not log the model artifact ({one_line(e)})")
            return False
        log.info(f"wandb: logged the model artifact model-{self.id} ({', '.join(artifact.manifest.entries)})")
        return True

    def close(self) -> None:
        if self.run is None:
            return
        try:
            self.run.finish()
        except Exception as e:  # noqa: BLE001
            warn(f"W&B could not finish the run cleanly ({one_line(e)})")
        self.run = None
        if self.offline:
            log.info(f"wandb: offline run saved; upload it with: wandb sync {self.sync_dir}")
