# pragma version 0.4.3
# pragma evm-version cancun
"""
@title golem-dask test GLM
@notice A minimal ERC-20 token used by golem-dask's embedded devnet to pay
        providers. Only the deployer (the minter) can create new tokens.
@dev The EVM version is pinned so that recompiling with a newer default does
     not change the shipped bytecode, and so the code runs on any chain that
     has reached Cancun.
"""

event Transfer:
    sender: indexed(address)
    receiver: indexed(address)
    value: uint256

event Approval:
    owner: indexed(address)
    spender: indexed(address)
    value: uint256

NAME: constant(String[32]) = "golem-dask test GLM"
SYMBOL: constant(String[8]) = "tGLM"
DECIMALS: constant(uint8) = 18

balanceOf: public(HashMap[address, uint256])
allowance: public(HashMap[address, HashMap[address, uint256]])
totalSupply: public(uint256)
minter: public(address)


@deploy
def __init__():
    self.minter = msg.sender


@view
@external
def name() -> String[32]:
    return NAME


@view
@external
def symbol() -> String[8]:
    return SYMBOL


@view
@external
def decimals() -> uint8:
    return DECIMALS


@internal
def _transfer(sender: address, receiver: address, amount: uint256):
    # Burning by sending to the zero address would silently shrink the supply
    # without a Transfer to a real holder; refuse it like most ERC-20 tokens.
    assert receiver != empty(address), "transfer to the zero address"
    # Vyper reverts on uint256 underflow, but an explicit check gives a
    # readable revert reason to the payer.
    balance: uint256 = self.balanceOf[sender]
    assert balance >= amount, "insufficient balance"
    # Checked just above: one storage read instead of two, no second overflow check.
    self.balanceOf[sender] = unsafe_sub(balance, amount)
    self.balanceOf[receiver] += amount
    log Transfer(sender=sender, receiver=receiver, value=amount)


@external
def transfer(receiver: address, amount: uint256) -> bool:
    self._transfer(msg.sender, receiver, amount)
    return True


@external
def transferFrom(sender: address, receiver: address, amount: uint256) -> bool:
    allowed: uint256 = self.allowance[sender][msg.sender]
    assert allowed >= amount, "insufficient allowance"
    # An allowance of max_value(uint256) means "unlimited" and is not
    # decremented, which saves a storage write for routers and escrows.
    if allowed != max_value(uint256):
        self.allowance[sender][msg.sender] = allowed - amount
    self._transfer(sender, receiver, amount)
    return True


@external
def approve(spender: address, amount: uint256) -> bool:
    self.allowance[msg.sender][spender] = amount
    log Approval(owner=msg.sender, spender=spender, value=amount)
    return True


@external
def mint(to: address, amount: uint256) -> bool:
    assert msg.sender == self.minter, "only the minter can mint"
    assert to != empty(address), "mint to the zero address"
    self.totalSupply += amount
    self.balanceOf[to] += amount
    log Transfer(sender=empty(address), receiver=to, value=amount)
    return True
