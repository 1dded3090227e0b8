"""The ``uda-sam`` command (Lightning), one module per part:

- :mod:`uda_sam.cli.entry_point`: the entry point (``main``), ``uda-sam --help`` and the one-message error handling;
- :mod:`uda_sam.cli.lightning`: :class:`~uda_sam.cli.lightning.UDASamCLI`, the LightningCLI of ``fit``,
  ``validate``, ``test``, ``predict``; :mod:`uda_sam.cli.checkpoint_config`: what ``predict --ckpt_path`` reads of a
  run from its checkpoint alone;
- :mod:`uda_sam.cli.pipeline`, :mod:`~uda_sam.cli.pseudo_label`, :mod:`~uda_sam.cli.evaluate`,
  :mod:`~uda_sam.cli.make_toy_data`: the package's own commands, each with its ``main(argv)``; the pipeline's file
  is read by :mod:`~uda_sam.cli.pipeline_config`, its results tables made by :mod:`~uda_sam.cli.pipeline_report`;
- :mod:`uda_sam.cli.run_lock`: one run a folder; :mod:`uda_sam.cli.console`: what the commands keep off the console.

This package imports none of them, so one command module (``uda_sam.cli.evaluate``) loads without Lightning.
"""
