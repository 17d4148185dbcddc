"""Drop-ins for the averaging classes of other libraries, on swa_fast's fused path.

One module per library, each with the original's public names, arguments, methods and state_dict
formats, so that code and checkpoints move both ways; swap the import and nothing else:

- `swa_fast.integrations.timm`: `ModelEmaV3`, `ModelEmaV2` (``timm.utils``).
- `swa_fast.integrations.diffusers`: `EMAModel` (``diffusers.training_utils``).
- `swa_fast.integrations.ema_pytorch`: `EMA` (``ema_pytorch``).
- `swa_fast.integrations.torch_ema`: `ExponentialMovingAverage` (``torch_ema``).
- `swa_fast.integrations.lightning`: `StochasticWeightAveraging`, `WeightAveraging`,
  `EMAWeightAveraging` (``lightning.pytorch.callbacks``).
- `swa_fast.integrations.transformers`: `EMACallback`, `SWACallback`, `PostHocEMACallback`: not
  drop-ins (transformers has no averaging callback) but `TrainerCallback`s for `transformers.Trainer`
  and TRL's trainers.
- `swa_fast.integrations.trl`: `BEMACallback` (``trl``), on `swa_fast.BEMA`.

Importing this package imports none of those libraries: only a submodule imports its own, when it
needs it. See docs/integrations.md.
"""
