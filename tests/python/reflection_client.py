"""A black-box gRPC client that knows nothing of Gatehouse but its address and a key.

It discovers the API through server reflection (v1 and v1alpha), builds message classes
from the descriptors the server sends, and calls TenantService with the admin key and with
a wrong key. Exit code 0 only if everything behaved.

usage: reflection_client.py HOST:PORT ADMIN_KEY
"""

import sys

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2

# grpcio-reflection ships a v1alpha client only. The v1 protocol has the same messages under
# another service name, so the v1 call is made with the v1alpha message classes.
def reflection_call(channel, version):
    return channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=v1alpha_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=v1alpha_pb2.ServerReflectionResponse.FromString,
    )


def list_services(call):
    responses = call(iter([v1alpha_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    return sorted(s.name for r in responses for s in r.list_services_response.service)


def fetch_pool(call, symbol):
    pool = descriptor_pool.DescriptorPool()
    responses = call(iter([v1alpha_pb2.ServerReflectionRequest(file_containing_symbol=symbol)]), timeout=10)
    files = {}
    for response in responses:
        for raw in response.file_descriptor_response.file_descriptor_proto:
            proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
            files[proto.name] = proto
    added = set()

    def add(name):
        if name in added or name not in files:
            return
        for dependency in files[name].dependency:
            add(dependency)
        pool.Add(files[name])
        added.add(name)

    for name in files:
        add(name)
    return pool


def main():
    address, key = sys.argv[1], sys.argv[2]
    channel = grpc.insecure_channel(address)
    grpc.channel_ready_future(channel).result(timeout=10)

    alpha = list_services(reflection_call(channel, "v1alpha"))
    print("v1alpha services: " + ", ".join(alpha))
    services = list_services(reflection_call(channel, "v1"))
    print("v1 services: " + ", ".join(services))
    for expected in ("gatehouse.v1.TenantService", "grpc.health.v1.Health"):
        if expected not in services or expected not in alpha:
            print(f"missing {expected}", file=sys.stderr)
            return 1

    pool = fetch_pool(reflection_call(channel, "v1"), "gatehouse.v1.TenantService")
    method = pool.FindServiceByName("gatehouse.v1.TenantService").FindMethodByName("ListTenants")
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    call = channel.unary_unary(
        "/gatehouse.v1.TenantService/ListTenants",
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )
    response = call(request_class(page_size=10), metadata=[("authorization", f"Bearer {key}")], timeout=10)
    print(f"tenants listed with the admin key: {len(response.tenants)}")
    try:
        call(request_class(), metadata=[("authorization", "Bearer wrong")], timeout=10)
        print("a wrong key was accepted", file=sys.stderr)
        return 1
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.UNAUTHENTICATED:
            print(f"a wrong key got {error.code()}", file=sys.stderr)
            return 1
    print("a wrong key: UNAUTHENTICATED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
