//! The protobuf codec of the generated stubs: prost's, except that a message that does not
//! decode (malformed bytes, a string field with invalid UTF-8) is INVALID_ARGUMENT, the
//! sender's fault, where prost's codec says INTERNAL.
use tonic::codec::{Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::ProstCodec;

#[derive(Debug, Clone, Default)]
pub struct FrisketCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Codec for FrisketCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = CheckedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        CheckedDecoder(std::marker::PhantomData)
    }
}

#[derive(Debug)]
pub struct CheckedDecoder<U>(std::marker::PhantomData<U>);

impl<U: prost::Message + Default> Decoder for CheckedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        decode_message(buf).map(Some)
    }
}

/// A message from its protobuf bytes, as the server's decoder reads it; bytes that do not
/// decode (malformed, a string field with invalid UTF-8) are INVALID_ARGUMENT.
pub fn decode_message<U: prost::Message + Default>(buf: impl prost::bytes::Buf) -> Result<U, Status> {
    U::decode(buf).map_err(|e| Status::invalid_argument(format!("the message is not valid protobuf: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::CancelRequest;
    use tonic::Code;

    #[test]
    fn decode_failures_are_invalid_argument() {
        for bad in [&[0x0a, 0x02, 0xff, 0xfe][..], &[0x08, 0xff]] {
            let status = decode_message::<CancelRequest>(bad).unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        }
        let ok = decode_message::<CancelRequest>(&[0x0a, 0x01, b'a'][..]).unwrap();
        assert_eq!(ok.job_id, "a");
    }
}
