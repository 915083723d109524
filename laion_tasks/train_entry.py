"""``python -m laion_tasks.train_entry ARGS``: open_clip's own trainer with our model configs registered.

Why a launcher: ``open_clip_train.main`` only knows the configs shipped inside open_clip;
``laion-tiny-clip`` (and any config in ``laion_tasks/model_configs``) must be added with
``open_clip.add_model_config`` in the same process, including every torchrun worker.
ARGS are open_clip_train's own command-line flags, passed through untouched, plus two of ours that
open_clip_train lacks (``train.extra_args`` carries them, so they are in the stage's result key):

* ``--channels-last``: the image tower in channels-last memory format;
* ``--fused-adamw``: torch's fused AdamW kernel instead of the per-tensor loop.

Both change only float summation order. On the CPU they cut a step of the demo world model's training
from 185 to 138 ms (measured, one thread, batch 128 at 64 px).
"""

from __future__ import annotations

import sys


def _webdataset_compat() -> None:
    """open_clip_torch 3.3.0 pins webdataset<=0.2.86; this project uses webdataset 1.x.

    The one incompatibility on the training path: webdataset 1.x's ``tar_file_expander``
    yields an empty dict as an end-of-shard marker (``eof_value={}``), and open_clip_train's
    ``group_by_keys_nothrow`` then fails with ``KeyError: 'fname'``. Asking for the 0.2.x
    behaviour (no marker) keeps open_clip_train's pipeline unchanged otherwise.
    """
    import functools
    import inspect

    from open_clip_train import data
    from webdataset.tariterators import tar_file_expander

    if "eof_value" in inspect.signature(tar_file_expander).parameters:
        data.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)


def _seeded_sample_shuffle(argv: list[str]) -> None:
    """Seed open_clip_train's sample shuffle buffer with ``--seed``, so that one seed gives one model.

    With ``--dataset-resampled`` open_clip_train seeds its shard sampling from ``--seed`` but builds its
    sample shuffle with ``wds.shuffle(bufsize, initial)``, which webdataset seeds from the process id and
    the clock: two trainings of one config and seed gave different models (the demo world model's held-out
    English threshold 0.540 vs 0.556, measured). Only this process (the trainer) is affected.
    """
    import functools

    from open_clip_train import data

    seed = int(argv[argv.index("--seed") + 1]) if "--seed" in argv else 0
    if getattr(data.wds.shuffle, "_laion_seeded", False):
        return
    seeded = functools.partial(data.wds.shuffle, seed=seed)
    seeded._laion_seeded = True  # type: ignore[attr-defined]
    data.wds.shuffle = seeded


def _pop_flag(args: list[str], flag: str) -> bool:
    if flag not in args:
        return False
    args.remove(flag)
    return True


def _channels_last_image_tower() -> None:
    """Convert the image tower of the model open_clip_train creates to channels-last (oneDNN and cuDNN
    convolutions run faster on it; the saved state dict loads into an ordinary model)."""
    import functools

    import torch
    from open_clip_train import main as train_main

    create = train_main.create_model_and_transforms

    @functools.wraps(create)
    def create_channels_last(*args, **kwargs):  # type: ignore[no-untyped-def]
        model, *rest = create(*args, **kwargs)
        model.visual.to(memory_format=torch.channels_last)
        return (model, *rest)

    train_main.create_model_and_transforms = create_channels_last


def _fused_adamw() -> None:
    """Make open_clip_train's ``optim.AdamW`` the fused kernel (its only optimizer)."""
    import functools
    import types

    import torch
    from open_clip_train import main as train_main

    train_main.optim = types.SimpleNamespace(AdamW=functools.partial(torch.optim.AdamW, fused=True))


def main(argv: list[str] | None = None) -> int:
    from laion_tasks.models.clip import register_local_configs

    args = list(sys.argv[1:] if argv is None else argv)
    register_local_configs()
    _webdataset_compat()
    _seeded_sample_shuffle(args)
    if _pop_flag(args, "--channels-last"):
        _channels_last_image_tower()
    if _pop_flag(args, "--fused-adamw"):
        _fused_adamw()
    from open_clip_train.main import main as open_clip_train_main

    result = open_clip_train_main(args)
    # open_clip_train returns -1 when the experiment directory already exists, None on success.
    return 1 if result == -1 else 0


if __name__ == "__main__":
    sys.exit(main())
