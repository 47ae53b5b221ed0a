"""Settings: every frozen config dataclass with its defaults written once, its validation, and
the sweep-file parser. The ground floor of ddsweep: it imports no torch, MLflow, Optuna,
diffusers or torchvision, and no other room of ddsweep (`tests/test_config.py` checks both).

    paths          every DDSWEEP_* variable and the .ddsweep root
    model          block names, ModelConfig (the U-Net's architecture)
    datasets       the datasets by name and what is known of one before loading it
    fid            FIDConfig, samplers, feature networks
    probekinds     the registry of probe kinds (ProbeKind)
    probesettings  the built-in kinds' settings and entries (their maths: ddsweep.probes)
    protocols      the field's probe protocols by name
    points         a point as {setting: value}, its canonical id and params
    probe          ProbeConfig (a study's shared probe settings) and a point's settings
    train          TrainConfig
    run            RunOptions (how a study runs), the default MLflow experiment
    sweep/         sweep files into a StudyConfig, and the grid of points it spans
"""
