"""market layer of golem-dask."""
