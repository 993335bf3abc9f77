"""The run-folder machinery around the science in `ddpm/`: the pipeline's stages over a run folder, the folder's
layout and files, caching shared between runs, locks, epoch scoring and selection, sample sharding and the
evaluation report.

    run_folder  what a run folder holds and where (RunPaths), its config and JSON files
    stages      data -> LeNet -> U-Net training -> sampling -> evaluation, each a function over a run folder
    training    `ddpm.training.fit` resumed from, and saving into, a run folder
    epoch_fld   each epoch's sample quality, and which epoch becomes the model
    samples     generated sets as shards and Parquet files
    cache       prepared data and trained evaluators shared between runs
    locks       one writer per run folder or cache entry
    report      evaluation.json as Markdown

The CLI and the Prefect flow (`flows/`) call these; the science modules import nothing from here
(tests/test_architecture.py).
"""
