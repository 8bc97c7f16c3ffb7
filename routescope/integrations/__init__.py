"""Training-framework callbacks that drive a routescope Recorder.

    from routescope.integrations.hf import RoutescopeCallback          # transformers.Trainer (extra [hf])
    from routescope.integrations.lightning import RoutescopeCallback   # lightning.Trainer (extra [lightning])

Each module imports its framework, and says how to install it when it is missing.
"""
