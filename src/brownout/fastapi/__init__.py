"""FastAPI integration: a lifespan that builds and closes Brownout's pieces, its middleware and error mapping,
and the dependencies a route uses."""
