"""Training-step benchmark: the trainer's DeepSpeed engine against plain eager PyTorch loops, in one process.

For each stage (pretrain: MGP, masked pretraining; finetune: BFT, balanced fine-tuning), path and input it times
whole training steps after a warm-up and reports images/s, step time, model TFLOP/s (``livt_ds.models.flops``),
share of the bf16 peak, peak GPU memory and the engine/eager ratio.

- ``settings``: what to run, resolved from the shipped recipes (model, micro-batches, loss, optimizer).
- ``runners``: one model + optimizer whose ``step`` is a whole training step: the engine (``project``) or an eager
  loop (``baseline``) in one of two precisions.
- ``timing``: the inputs (synthetic tensors or the real shard stream), the timed steps and the figures.
- ``matrix``: every run of the settings and the ZeRO memory sweep, as one JSON document handed to a callback
  after each finished entry (so a run cut short keeps what finished).
- ``table``: the human table and the list of failed runs.

The library raises ``ConfigError`` on settings it cannot run; ``scripts/bench_train.py`` is the command line.
"""
