"""The chaos harness's parts; `bench/chaos.py` is the command and its documentation.

One concern a module: config (scenarios, settings), helpers and urls, processes
(Procfile argv, PDEATHSIG), dynos, relay and proxies (the fault proxies' child),
proxy_cost, naive_app, http_client and load (the load child), calibrate, progress,
backlog, cpu and monitor (what the run costs the machine), stage/faults/mode_run (one
mode's run), audit, figures, report and machine_report, plot, run (run_chaos). The modules import `app` and
`tests.support` by absolute name: the project's root must be on sys.path, which
bench/chaos.py sees to when run as a script."""
