"""provider runtime layer of golem-dask."""
