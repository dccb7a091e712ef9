//! A gRPC codec whose messages are serde types encoded as JSON.
//!
//! gRPC (HTTP/2, deadlines, flow control, status codes) frames each message; the message itself
//! is JSON of the `schema` types. Field and variant names, not positions, identify data, so a
//! node of version N+1 adding an optional field or a new request kind still talks to a gateway of
//! version N during a rolling upgrade (unknown fields are ignored; an unknown request kind is a
//! clear error, not a misread).

use bytes::{Buf, BufMut};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::marker::PhantomData;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// The codec (see the module documentation).
#[derive(Debug)]
pub struct JsonCodec<E, D>(PhantomData<(E, D)>);

impl<E, D> Default for JsonCodec<E, D> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

/// Encoding half.
#[derive(Debug)]
pub struct JsonEncoder<E>(PhantomData<E>);

/// Decoding half.
#[derive(Debug)]
pub struct JsonDecoder<D>(PhantomData<D>);

impl<E: Serialize + Send + 'static> Encoder for JsonEncoder<E> {
    type Item = E;
    type Error = Status;

    fn encode(&mut self, item: E, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        serde_json::to_writer(dst.writer(), &item)
            .map_err(|e| Status::internal(format!("encoding failed: {e}")))
    }
}

impl<D: DeserializeOwned + Send + 'static> Decoder for JsonDecoder<D> {
    type Item = D;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<D>, Status> {
        if !src.has_remaining() {
            return Ok(None);
        }
        serde_json::from_reader(src.reader())
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("undecodable message: {e}")))
    }
}

impl<E, D> Codec for JsonCodec<E, D>
where
    E: Serialize + Send + 'static,
    D: DeserializeOwned + Send + 'static,
{
    type Encode = E;
    type Decode = D;
    type Encoder = JsonEncoder<E>;
    type Decoder = JsonDecoder<D>;

    fn encoder(&mut self) -> Self::Encoder {
        JsonEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        JsonDecoder(PhantomData)
    }
}
