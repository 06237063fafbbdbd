# pragma version 0.4.3
# pragma evm-version cancun
"""
@title golem-dask batch payer
@notice Pays many providers in one transaction: for each payee it moves tokens
        from the caller to the payee with the token's transferFrom.  The caller
        approves this contract on the token once.
@dev Stateless: it holds no tokens and no ether, has no owner, and can only move
     tokens of the account that calls it (msg.sender), so a leaked address or a
     malicious caller can do nothing with it that they could not do directly.
"""

from ethereum.ercs import IERC20

MAX_PAYEES: constant(uint256) = 256
ADDRESS_MASK: constant(uint256) = 2**160 - 1

event BatchPaid:
    payer: indexed(address)
    token: indexed(address)
    count: uint256


@external
def batchTransferFrom(token: address, payments: DynArray[uint256, MAX_PAYEES]):
    """
    @notice For each payment, move its amount of token from the caller to its payee.
    @param payments Each word packs one payment: amount << 160 | payee.  One word per
           payee instead of two halves the calldata, which is much of the per-payee
           gas once the transfers themselves are paid for.
    @dev Reverts (moving nothing) if the list is empty or any single transfer fails.
    """
    assert len(payments) > 0, "nothing to pay"
    # Checked once here rather than by every call below.
    assert token.is_contract, "token is not a contract"
    for word: uint256 in payments:
        payee: address = convert(convert(word & ADDRESS_MASK, uint160), address)
        assert extcall IERC20(token).transferFrom(msg.sender, payee, word >> 160, skip_contract_check=True), \
            "transfer failed"
    log BatchPaid(payer=msg.sender, token=token, count=len(payments))
