//! Generates the gRPC client and server of the cluster service (`node/src/cluster`) with
//! `tonic-build`'s manual builder: no `.proto` file and no `protoc`; the messages are the serde
//! types of `cluster::wire`, carried by a JSON codec.

fn main() {
    let call = tonic_build::manual::Method::builder()
        .name("call")
        .route_name("Call")
        .input_type("crate::cluster::wire::CallRequest")
        .output_type("crate::cluster::wire::CallResponse")
        .codec_path("crate::cluster::codec::JsonCodec")
        .build();
    let service = tonic_build::manual::Service::builder()
        .name("Cluster")
        .package("palaver.cluster.v1")
        .method(call)
        .build();
    tonic_build::manual::Builder::new().compile(&[service]);
}
