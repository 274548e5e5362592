"""train.py under torchrun with test-only probes (not a test module).

    torchrun ... tests/ddp_probe.py <train.py arguments>

``DDP_PROBE_DIR``: after each training epoch every rank saves its model's and its EMA's
weights there (``rank<R>-epoch<E>.pt``, with the training images and labels of GPU-resident
data), and each checkpoint it writes is recorded in
``saves-rank<R>.txt`` (epoch, file name, sha256 of the bytes written).
``DDP_PROBE_FAIL=R:E``: rank R raises a RuntimeError as epoch E begins, while the other
ranks wait for it in the epoch's first gradient all-reduce.
``DDP_PROBE_COMPILE_BACKEND``: ``--compile`` compiles with this torch.compile backend
(``aot_eager``: Dynamo and AOTAutograd as with inductor, without generating code).
"""
import hashlib
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import utils.accel  # noqa: E402
import utils.checkpoint  # noqa: E402
from subprocesses import load_script  # noqa: E402
from utils.distributed import unwrap_model  # noqa: E402

PROBE_DIR = Path(os.environ["DDP_PROBE_DIR"]) if os.environ.get("DDP_PROBE_DIR") else None
FAIL = tuple(int(v) for v in os.environ["DDP_PROBE_FAIL"].split(":")) if os.environ.get("DDP_PROBE_FAIL") else None
COMPILE_BACKEND = os.environ.get("DDP_PROBE_COMPILE_BACKEND")
RANK = int(os.environ.get("RANK", "0"))


class InjectedFault(RuntimeError):
    pass


def main() -> None:
    train = load_script("train")
    real_train_one_epoch, real_save = train.train_one_epoch, train.save_checkpoint

    def train_one_epoch(model, loader, *args, **kwargs):
        epoch = args[5]  # after (criterion, optimizer, scheduler, precision, env), as train.py calls it
        if FAIL == (RANK, epoch):
            raise InjectedFault(f"injected fault on rank {RANK} in epoch {epoch}")
        metrics = real_train_one_epoch(model, loader, *args, **kwargs)
        if PROBE_DIR is not None:
            ema, images = kwargs.get("ema"), getattr(loader, "images", None)  # images: GPU-resident data
            torch.save({"model": unwrap_model(model).state_dict(), "ema": ema.module.state_dict() if ema else None,
                        "images": None if images is None else images.cpu(),
                        "labels": None if images is None else loader.labels.cpu()},
                       PROBE_DIR / f"rank{RANK}-epoch{epoch}.pt")
        return metrics

    def save_checkpoint(state, path):
        written = real_save(state, path)
        if PROBE_DIR is not None:
            digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            with open(PROBE_DIR / f"saves-rank{RANK}.txt", "a", encoding="utf-8") as fh:
                fh.write(f"{state['epoch']} {Path(path).name} {digest}\n")
        return written

    if COMPILE_BACKEND:
        real_compile_blocks = utils.accel.compile_blocks
        utils.accel.compile_blocks = lambda model, **kw: real_compile_blocks(model, **kw, backend=COMPILE_BACKEND)
    # train.py's own name and the one save_best writes through
    train.train_one_epoch, train.save_checkpoint = train_one_epoch, save_checkpoint
    utils.checkpoint.save_checkpoint = save_checkpoint
    train.main(sys.argv[1:])


if __name__ == "__main__":
    main()
