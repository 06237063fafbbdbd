"""protocol layer of golem-dask."""
