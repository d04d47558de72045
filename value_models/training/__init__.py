"""Training value models: prompts, sampling with vLLM, rewards, TD(lambda), the vBoN transform,
the trainer and its pydantic configs, evaluation and calibration, and the recipes.

Nothing here is imported by the plugin or the vLLM server (see value_models/__init__.py for the
split). Import the modules themselves (`value_models.training.trainer`, ...); the common names are
also exported lazily from `value_models`.
"""
