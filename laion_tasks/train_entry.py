"""``python -m laion_tasks.train_entry ARGS``: open_clip's own trainer with our model configs registered.

Why a launcher: ``open_clip_train.main`` only knows the configs shipped inside open_clip;
``laion-tiny-clip`` (and any config in ``laion_tasks/model_configs``) must be added with
``open_clip.add_model_config`` in the same process, including every torchrun worker.
ARGS are open_clip_train's own command-line flags, passed through untouched.
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

    import open_clip_train.data as data
    from webdataset.tariterators import tar_file_expander

    if "eof_value" in inspect.signature(tar_file_expander).parameters:
        data.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)


def main(argv: list[str] | None = None) -> int:
    from laion_tasks.models.clip import register_local_configs

    register_local_configs()
    _webdataset_compat()
    from open_clip_train.main import main as open_clip_train_main

    result = open_clip_train_main(list(sys.argv[1:] if argv is None else argv))
    # open_clip_train returns -1 when the experiment directory already exists, None on success.
    return 1 if result == -1 else 0


if __name__ == "__main__":
    sys.exit(main())
