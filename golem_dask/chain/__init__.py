"""What both sides of the market read of Ethereum.

A requestor pays and a provider checks that it was paid; both need to reach a chain,
know the shipped contracts and read token transfers.  Only that shared part lives here:
token units (:mod:`~golem_dask.chain.units`), connecting to a node
(:mod:`~golem_dask.chain.rpc`), the contract artefacts (:mod:`~golem_dask.chain.contracts`),
deploying and funding them (:mod:`~golem_dask.chain.deploy`), the embedded devnet
(:mod:`~golem_dask.chain.devnet`), the anvil node (:mod:`~golem_dask.chain.anvil`) and
"did this transaction move this amount from X to Y" (:mod:`~golem_dask.chain.transfers`).
The requestor's money (budget, ledger, payer) is in :mod:`golem_dask.payment`, which this
package never imports.
"""
