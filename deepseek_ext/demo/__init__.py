"""The main job of this repository: train a small GPT-style language model
twice, baseline vs the low-cost recipe, and compare what each run cost.

Run it with ``python -m deepseek_ext.demo`` (``--help`` for the options). Its
modules are private: the demo's model comes from :mod:`deepseek_ext.recipe`,
and its training loop is an example, not an API.
"""
