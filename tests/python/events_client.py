"""A downstream subscriber written against nothing but server reflection: it subscribes to a
tenant's user events from the start of the log, reads COUNT of them, then asks for the
tenant's integrity report.

Prints one line per event (position, id, event type), then `intact <true|false> <events
checked>`.

usage: events_client.py HOST:PORT TENANT_KEY COUNT
"""

import sys

import grpc
from google.protobuf import message_factory
from reflection_client import fetch_pool, reflection_call

SERVICE = "gatehouse.v1.EventService"


def method(pool, name):
    found = pool.FindServiceByName(SERVICE).FindMethodByName(name)
    return (
        message_factory.GetMessageClass(found.input_type),
        message_factory.GetMessageClass(found.output_type),
    )


def main():
    address, key, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    channel = grpc.insecure_channel(address)
    grpc.channel_ready_future(channel).result(timeout=10)
    pool = fetch_pool(reflection_call(channel, "v1"), SERVICE)
    metadata = [("authorization", f"Bearer {key}")]

    Subscribe, Event = method(pool, "Subscribe")
    subscribe = channel.unary_stream(
        f"/{SERVICE}/Subscribe",
        request_serializer=Subscribe.SerializeToString,
        response_deserializer=Event.FromString,
    )
    request = Subscribe(after=0)
    request.filter.stream_types.append("user")
    stream = subscribe(request, metadata=metadata, timeout=30)
    for received, event in enumerate(stream, start=1):
        print(f"{event.position} {event.id} {event.event_type}")
        if received == count:
            stream.cancel()
            break

    Verify, Report = method(pool, "VerifyIntegrity")
    verify = channel.unary_unary(
        f"/{SERVICE}/VerifyIntegrity",
        request_serializer=Verify.SerializeToString,
        response_deserializer=Report.FromString,
    )
    report = verify(Verify(), metadata=metadata, timeout=30)
    print(f"intact {str(report.intact).lower()} {report.events_checked}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
