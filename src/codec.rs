//! The protobuf codec of the generated stubs: prost's, except that a message that does not
//! decode (malformed bytes, a string field with invalid UTF-8) is INVALID_ARGUMENT, the
//! sender's fault, where prost's codec says INTERNAL.
use tonic::codec::{Codec, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::{ProstCodec, ProstDecoder};

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
        CheckedDecoder(self.0.decoder())
    }
}

#[derive(Debug)]
pub struct CheckedDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for CheckedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(caller_fault)
    }

    fn buffer_settings(&self) -> tonic::codec::BufferSettings {
        self.0.buffer_settings()
    }
}

/// prost's decoder fails only on undecodable bytes, and says so with INTERNAL.
fn caller_fault(status: Status) -> Status {
    match status.code() {
        Code::Internal => Status::invalid_argument(format!("the message is not valid protobuf: {}", status.message())),
        _ => status,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_failures_are_invalid_argument() {
        assert_eq!(caller_fault(Status::internal("invalid wire type")).code(), Code::InvalidArgument);
        assert_eq!(caller_fault(Status::resource_exhausted("too big")).code(), Code::ResourceExhausted);
    }
}
