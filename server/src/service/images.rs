//! The Generate stream of a request for several images (`num_images`): the image jobs'
//! streams merged as their events come, ending after the last Result.
use super::clients::JobSlot;
use super::jobs::{EventResult, EventStream};
use frisket_proto::v1::generate_event::Event;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio_stream::Stream;

pub struct ImagesStream {
    /// The streams of the images whose Result has not come yet.
    streams: Vec<EventStream>,
    /// Counts the request against its connection's job limit until its end.
    slot: Option<JobSlot>,
    /// Where polling resumes, so that no image's events wait behind another's.
    next: usize,
}

impl ImagesStream {
    pub fn new(streams: Vec<EventStream>, slot: Option<JobSlot>) -> Self {
        Self { streams, slot, next: 0 }
    }

    /// The request ended: dropping the other streams stops their jobs (as a client that
    /// left would).
    fn end(&mut self) {
        self.streams.clear();
        self.slot = None;
    }
}

impl Stream for ImagesStream {
    type Item = EventResult;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<EventResult>> {
        let count = self.streams.len();
        for k in 0..count {
            let i = (self.next + k) % count;
            match Pin::new(&mut self.streams[i]).poll_next(cx) {
                Poll::Pending => continue,
                Poll::Ready(Some(Ok(event))) => {
                    if matches!(event.event, Some(Event::Result(_))) {
                        drop(self.streams.remove(i));
                        if self.streams.is_empty() {
                            self.slot = None;
                        }
                        self.next = i;
                    } else {
                        self.next = i + 1;
                    }
                    return Poll::Ready(Some(Ok(event)));
                }
                // One image failed (or was cancelled): the request ends with its status.
                Poll::Ready(Some(Err(status))) => {
                    self.end();
                    return Poll::Ready(Some(Err(status)));
                }
                Poll::Ready(None) => {
                    self.end();
                    return Poll::Ready(None);
                }
            }
        }
        if self.streams.is_empty() {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }
}
