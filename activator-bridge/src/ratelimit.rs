//! Client-side QPS/burst for the kube client, like client-go's token bucket.
//!
//! A tower layer under kube's `Client`: `poll_ready` waits for a token, so
//! every request (including each watch (re)start) takes one, and long
//! watches do not hold one. kube's `Client` puts the stack behind a
//! `tower::buffer::Buffer`, which drives `poll_ready` then `call` for one
//! request at a time, so a token taken in `poll_ready` is spent by exactly
//! the next `call`. A semaphore would bound concurrency, not rate, which is
//! not what `--kube-api-qps` means anywhere else in Kubernetes.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

#[derive(Debug, Clone, Copy)]
pub struct RateLimitLayer {
    qps: f64,
    burst: f64,
}

impl RateLimitLayer {
    /// `qps <= 0` disables the limit.
    pub fn new(qps: f64, burst: u32) -> Self {
        Self {
            qps,
            burst: f64::from(burst.max(1)),
        }
    }
}

impl<S> tower_layer::Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;
    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            qps: self.qps,
            burst: self.burst,
            tokens: self.burst,
            last: Instant::now(),
            sleep: None,
            has_token: false,
        }
    }
}

pub struct RateLimit<S> {
    inner: S,
    qps: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
    has_token: bool,
}

impl<S> RateLimit<S> {
    /// Takes a token, or says how long until one is there.
    fn take(&mut self) -> Result<(), Duration> {
        if self.qps <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.qps).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.qps))
        }
    }
}

impl<S, R> tower_service::Service<R> for RateLimit<S>
where
    S: tower_service::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        while !self.has_token {
            if let Some(sleep) = self.sleep.as_mut() {
                ready!(sleep.as_mut().poll(cx));
                self.sleep = None;
            }
            match self.take() {
                Ok(()) => self.has_token = true,
                Err(wait) => self.sleep = Some(Box::pin(tokio::time::sleep(wait))),
            }
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        self.has_token = false;
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower_layer::Layer;
    use tower_service::Service;

    struct Echo;
    impl tower_service::Service<u32> for Echo {
        type Response = u32;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<u32, Self::Error>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, r: u32) -> Self::Future {
            std::future::ready(Ok(r))
        }
    }

    #[tokio::test]
    async fn burst_then_qps() {
        let mut svc = RateLimitLayer::new(100.0, 5).layer(Echo);
        let start = Instant::now();
        for i in 0..25u32 {
            std::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
            assert_eq!(svc.call(i).await.unwrap(), i);
        }
        // 5 at once, then 20 more at 100/s.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(190) && took < Duration::from_secs(2),
            "{took:?}"
        );
    }
}
