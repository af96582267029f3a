"""Independent implementations for the sign-in tests: pyotp computes TOTP codes and PyJWT
verifies Gatehouse's tokens against its published JWKS.

    tokens_client.py totp SECRET [OFFSET_SECONDS]   -> prints the code
    tokens_client.py verify JWKS_URL ISSUER AUDIENCE TOKEN
        -> prints the claims as JSON, or exits 1 with the reason
    tokens_client.py forge TOKEN
        -> prints two forgeries of TOKEN's claims: one with alg "none", one signed by a
           fresh ES256 key under the same kid
"""

import json
import sys
import time

import jwt
import pyotp
from cryptography.hazmat.primitives.asymmetric import ec


def main() -> int:
    command = sys.argv[1]
    if command == "totp":
        offset = int(sys.argv[3]) if len(sys.argv) > 3 else 0
        print(pyotp.TOTP(sys.argv[2]).at(int(time.time()) + offset))
        return 0
    if command == "verify":
        jwks_url, issuer, audience, token = sys.argv[2:6]
        try:
            key = jwt.PyJWKClient(jwks_url).get_signing_key_from_jwt(token)
            claims = jwt.decode(
                token, key.key, algorithms=["ES256"], audience=audience, issuer=issuer
            )
        except Exception as error:  # noqa: BLE001 - the reason is the output
            print(f"rejected: {type(error).__name__}: {error}")
            return 1
        print(json.dumps(claims))
        return 0
    if command == "forge":
        token = sys.argv[2]
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
        print(jwt.encode(claims, None, algorithm="none"))
        other = ec.generate_private_key(ec.SECP256R1())
        print(jwt.encode(claims, other, algorithm="ES256", headers={"kid": header["kid"]}))
        return 0
    print(f"unknown command {command}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
