"""The worker dyno: Dramatiq consumers that apply queued writes with the web's own apply step.

Start it with the Procfile's `worker:` line (`dramatiq brownout._worker.main ...`).
`brownout._worker.main` is the only module that reads the environment and sets
Dramatiq's broker, before any actor is declared; everything else here is
built from explicit arguments so tests can run it against their own queue and
database.
"""
