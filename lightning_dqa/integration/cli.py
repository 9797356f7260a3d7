"""The ``lightning-dqa`` command: LightningCLI with ``fit``, ``validate`` and ``test`` over YAML configs.

Any LightningModule and LightningDataModule can be named by ``class_path``; ``DQACallback`` goes in
``trainer.callbacks``. Working configs live in ``examples/configs/``::

    lightning-dqa validate --config examples/configs/resnet32_cifar10_ptq.yaml
    lightning-dqa fit --config examples/configs/resnet32_cifar10_qat.yaml
    lightning-dqa validate --config examples/configs/resnet32_cifar10_ptq.yaml --print_config
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

__all__ = ["main", "run_cli"]


def run_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build and run the CLI (``args`` default to ``sys.argv[1:]``); returns the CLI object."""
    return LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_callback=None,  # it would write config.yaml into the working directory on every run
        auto_configure_optimizers=False,
    )


def main() -> None:
    """Console entry point ``lightning-dqa`` (returns nothing, so the exit status is 0 on success)."""
    run_cli()


if __name__ == "__main__":  # pragma: no cover
    main()
