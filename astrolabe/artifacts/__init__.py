"""Stage artifacts and the run engine. Import the modules themselves (this package exports nothing):

``atomic``    the one atomic writer: files and directories published by tmp sibling, fsync, rename, dir fsync
``manifest``  Manifest, FileEntry, sha256_file, verify, artifact errors
``keys``      cache keys: canonical JSON, cache_key, input identities, the key of a stage call
``stagedir``  the run layout (run_dir, stage_root), StageDir (begin -> publish), stale temporaries, find_current
``lock``      RunLock: one writing process per run
``ranks``     rank_slice, rank_filename: each rank's share under torchrun
``stage``     StageInfo, StageResult (typed, namespaced metrics), StageModule, StageRegistry
``engine``    execute: cache check, run (1 or N ranks), merge of rank results, publish
``plan``      the run as a graph of stage calls: build_plan, plan_status, run_plan, run_stage, explain_change

Nothing here imports ``stages/``, ``flows/`` or Prefect: stage modules are passed in as arguments.
"""
