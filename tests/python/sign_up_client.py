"""A black-box client: signs a customer up and verifies the email, knowing only the server's
address (the API comes from server reflection), a tenant, an app's client id, a tenant key to
check the result, and where the embedded outbox file is.

usage: sign_up_client.py HOST:PORT TENANT_ID CLIENT_ID TENANT_KEY OUTBOX_PATH
"""

import json
import sys
import time

import grpc
from reflection_client import fetch_pool, reflection_call
from google.protobuf import json_format, message_factory


def unary(channel, pool, method_name):
    service = pool.FindServiceByName("gatehouse.v1.UserService")
    method = service.FindMethodByName(method_name)
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    call = channel.unary_unary(
        f"/gatehouse.v1.UserService/{method_name}",
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )
    return request_class, call


def wait_for_code(outbox, email, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with open(outbox, encoding="utf-8") as lines:
                for line in lines:
                    message = json.loads(line)
                    if message["to"] == email and message.get("code"):
                        return message["code"]
        except FileNotFoundError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"no code for {email} in {outbox}")


def main():
    address, tenant_id, client_id, key, outbox = sys.argv[1:6]
    channel = grpc.insecure_channel(address)
    grpc.channel_ready_future(channel).result(timeout=10)
    pool = fetch_pool(reflection_call(channel, "v1"), "gatehouse.v1.UserService")

    email = "python.customer@example.com"
    SignUp, sign_up = unary(channel, pool, "SignUp")
    response = sign_up(
        SignUp(tenant_id=tenant_id, client_id=client_id, email=email,
               password="a python passphrase", attributes={"given_name": "Guido"}),
        timeout=30,
    )
    print(f"signed up: {response.user_id}")
    code = wait_for_code(outbox, email)
    VerifyEmail, verify = unary(channel, pool, "VerifyEmail")
    verify(VerifyEmail(tenant_id=tenant_id, user_id=response.user_id, code=code), timeout=10)
    GetUser, get_user = unary(channel, pool, "GetUser")
    user = get_user(
        GetUser(tenant_id=tenant_id, user_id=response.user_id),
        metadata=[("authorization", f"Bearer {key}")],
        timeout=10,
    )
    as_json = json_format.MessageToDict(user)
    print(f"email: {as_json['email']}")
    print(f"status: {as_json['status']}")
    return 0 if as_json["status"] == "USER_STATUS_ACTIVE" and as_json.get("emailVerified") else 1


if __name__ == "__main__":
    sys.exit(main())
