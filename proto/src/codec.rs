//! The protobuf codec for `hufu.v1`: prost encoding, with undecodable input
//! reported as `INVALID_ARGUMENT` (the caller sent garbage) instead of
//! tonic's default `INTERNAL` (which would blame the node).

use std::marker::PhantomData;

use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::ProstCodec;

#[derive(Debug, Clone)]
pub struct HufuCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for HufuCodec<T, U> {
    fn default() -> Self {
        HufuCodec { _pd: PhantomData }
    }
}

pub struct HufuDecoder<U: prost::Message + Default + Send + 'static> {
    inner: <ProstCodec<(), U> as Codec>::Decoder,
}

impl<U> Decoder for HufuDecoder<U>
where
    U: prost::Message + Default + Send + 'static,
{
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.inner.decode(buf).map_err(|status| {
            if status.code() == tonic::Code::Internal {
                Status::invalid_argument(format!(
                    "malformed {} message: {}",
                    short_name::<U>(),
                    status.message()
                ))
            } else {
                status
            }
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.inner.buffer_settings()
    }
}

fn short_name<U>() -> &'static str {
    let full = std::any::type_name::<U>();
    full.rsplit("::").next().unwrap_or(full)
}

impl<T, U> Codec for HufuCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = HufuDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        HufuDecoder {
            inner: ProstCodec::<(), U>::default().decoder(),
        }
    }
}
