"""Values on chain: token amounts (``Decimal`` token units for people and protocol messages,
integer wei on chain) and addresses."""

from __future__ import annotations

from decimal import Decimal

from golem_dask.errors import PaymentError
from golem_dask.protocol.identity import checksum_address

#: Every ERC-20 token golem-dask pays with has 18 decimals, like GLM.
TOKEN_DECIMALS = 18
WEI_PER_TOKEN = 10**TOKEN_DECIMALS


def to_wei(amount: Decimal) -> int:
    """Convert a token amount to integer wei, refusing amounts finer than one wei.

    Examples
    --------
    >>> to_wei(Decimal("1.5"))
    1500000000000000000
    """
    wei = amount * WEI_PER_TOKEN
    if wei != wei.to_integral_value():
        raise ValueError(f"{amount} has more than {TOKEN_DECIMALS} decimals")
    return int(wei)


def from_wei(wei: int) -> Decimal:
    """Convert integer wei to a ``Decimal`` token amount.

    Examples
    --------
    >>> from_wei(1500000000000000000)
    Decimal('1.5')
    """
    amount = Decimal(wei).scaleb(-TOKEN_DECIMALS).normalize()
    # normalize() writes whole tens as 1E+1; keep plain notation for people and logs.
    return amount.quantize(Decimal(1)) if amount == amount.to_integral_value() else amount


def address(value: str, role: str = "address") -> str:
    """``value`` in its checksummed form, or PaymentError naming the ``role`` (e.g. ``"payee"``).

    Examples
    --------
    >>> address("0x19e7e376e7c213b7e7e7e46cc70a5dd086daff2a", "payee")
    '0x19E7E376E7C213B7E7e7e46cc70A5dD086DAff2A'
    """
    try:
        return checksum_address(value)
    except ValueError:
        raise PaymentError(f"{role} {value!r} is not a valid Ethereum address "
                           "(0x followed by 40 hex digits, checksummed or all lower case)") from None
