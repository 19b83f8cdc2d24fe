"""The research bench: ``m2diff bench`` (= ``m2diff simulate -m``) sweeps settings with Hydra's
multirun semantics and compares federated, centralised and local-only training per site.

- ``sweep``: the words -> runs (Hydra's override parser and BasicSweeper's cartesian
  product), each with its composed config, a content identity and a folder name;
- ``runs``: one run in its own folder (resolved config, ``run.json``), skipped when done;
- ``summary``: every run's held-out rows -> one table per setting x site x cohort x method,
  the answers (federated vs centralised, federated vs local at the smallest site), CSV and
  markdown;
- ``figure``: PSNR per site for each setting, the LD input marked;
- ``command``: the CLI entry.
"""
