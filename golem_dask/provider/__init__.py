"""provider layer of golem-dask."""
