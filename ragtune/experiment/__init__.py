"""The experiment layer: grid search over strategies, selection on dev, leaderboards, comparison.

  spec        the experiment file's schema and validation (`experiments/*.yaml`)
  grid        which runs a strategy's declared phases call for, and selection of the best point
  records     what happened to each run, and the cost arithmetic over runs
  runner      `ragtune experiment`: stages of runs through a launcher, test of the selected runs
  launchers   local (one run per GPU) and Ray execution of `ragtune` subprocesses
  progress    the per-run lines and the live status line
  stats       bootstrap intervals and the paired permutation test
  leaderboard rows, tables and files shared by the runner and `ragtune compare`
  compare     `ragtune compare`
It depends on the core (ragtune.rundir, config, metrics, strategies), never the reverse; the
command-line parsing of both commands is in ragtune.cli.
"""
